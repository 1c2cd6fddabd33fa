/*
 * vnet-recorder: what a Linux guest's network driver received, frame by frame, streamed
 * to the host over a virtio-serial port.
 *
 * Per received frame it records what the driver set on the skb (receive queue, hash,
 * whether the hash covers L4) and the frame's identity as its headers give it (IP
 * version, addresses, L4 protocol, ports, L3 length). Source: an event probe ("eprobe",
 * Linux 5.15+) on the tracepoint net/napi_gro_receive_entry, which fires once per frame
 * the driver hands to the stack, before GRO merges anything. The probe fetches the
 * tracepoint's queue_mapping, hash, l4_hash, len and protocol, and the first HDR_BYTES
 * bytes at skb->data (the L3 header: the driver has pulled the Ethernet header). The
 * offset of `data` in struct sk_buff comes from the kernel's BTF
 * (/sys/kernel/btf/vmlinux) or from -d. The probe writes into a tracing instance of its
 * own; the recorder reads its binary per-CPU buffers (trace_pipe_raw) and writes one
 * text line per frame:
 *
 *   h vnet-recorder 1 <kernel release> <interface> <skb data offset>   (once, first)
 *   r <seq> <cpu> <queue_mapping> <hash> <l4> <ethertype> <l3 len> <ip version>
 *     <l4 proto> <src port> <dst port> <src> <dst> <flags> <headers>      (per frame)
 *   l <cpu> <count>     the kernel's buffer overflowed: count frames lost (-1: unknown)
 *   p <seq>             a pass over every CPU's buffer ended; seq = next record's
 *
 * hash, ethertype, flags, src and dst in hex (addresses 8 or 32 digits, "-" if none);
 * queue_mapping as the driver set it (rx queue + 1, 0 = none recorded); flags: 1 fragment,
 * 2 IPv6 extension headers, 4 headers cut short (not all of them in the bytes fetched or
 * the frame), 8 a non-first fragment (no ports); headers: bytes of IP and TCP/UDP headers
 * (0 if not read), so that the payload is <l3 len> - <headers>.
 *
 * Usage: vnet-recorder [-i IFACE] [-o PATH | -p PORT_NAME] [-d SKB_DATA_OFFSET]
 *                      [-b BUFFER_KB]
 * Default: -i eth0 -p org.vnetbackend.records.0 (found in /sys/class/virtio-ports).
 * Build: gcc -O2 -static -o vnet-recorder vnet-recorder.c     (needs root in the guest)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#define TRACEFS "/sys/kernel/tracing"
#define INSTANCE TRACEFS "/instances/vnet-recorder"
#define GROUP "vnetrec"
#define EVENT "rx"
#define HDR_BYTES 128
#define PAGE 4096
#define MAX_CPUS 64
#define OUT_SIZE (64 * 1024)

static volatile sig_atomic_t stopping;
static int out_fd = -1;
static char out[OUT_SIZE];
static size_t out_len;
static unsigned long long seq;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "vnet-recorder: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static void flush_out(void)
{
	size_t done = 0;
	while (done < out_len) {
		ssize_t n = write(out_fd, out + done, out_len - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("write to the records port: %s", strerror(errno));
		}
		done += (size_t)n;
	}
	out_len = 0;
}

static void emit(const char *fmt, ...)
{
	va_list ap;
	int n;
	if (OUT_SIZE - out_len < 512)
		flush_out();
	va_start(ap, fmt);
	n = vsnprintf(out + out_len, OUT_SIZE - out_len, fmt, ap);
	va_end(ap);
	if (n > 0)
		out_len += (size_t)n;
}

static int write_file(const char *path, const char *text, int append)
{
	int fd = open(path, O_WRONLY | (append ? O_APPEND : O_TRUNC));
	ssize_t n;
	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? 0 : -1;
}

static char *read_file(const char *path, size_t *size)
{
	int fd = open(path, O_RDONLY);
	size_t cap = 1 << 16, len = 0;
	char *buf;
	if (fd < 0)
		return NULL;
	buf = malloc(cap + 1);
	for (;;) {
		ssize_t n;
		if (len == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 1);
		}
		n = read(fd, buf + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	buf[len] = 0;
	if (size)
		*size = len;
	return buf;
}

/* The byte offset of member `data` in struct sk_buff, from the kernel's BTF; -1 if not found. */
static long skb_data_offset_from_btf(void)
{
	size_t size;
	unsigned char *btf = (unsigned char *)read_file("/sys/kernel/btf/vmlinux", &size);
	uint32_t hdr_len, type_off, type_len, str_off, str_len, pos, end;
	long found = -1;
	if (!btf || size < 24 || *(uint16_t *)btf != 0xeB9F)
		goto out;
	hdr_len = *(uint32_t *)(btf + 4);
	type_off = *(uint32_t *)(btf + 8);
	type_len = *(uint32_t *)(btf + 12);
	str_off = *(uint32_t *)(btf + 16);
	str_len = *(uint32_t *)(btf + 20);
	if ((size_t)hdr_len + str_off + str_len > size || (size_t)hdr_len + type_off + type_len > size)
		goto out;
	const char *strs = (const char *)btf + hdr_len + str_off;
	pos = hdr_len + type_off;
	end = pos + type_len;
	while (pos + 12 <= end) {
		uint32_t name = *(uint32_t *)(btf + pos), info = *(uint32_t *)(btf + pos + 4);
		uint32_t kind = (info >> 24) & 0x1f, vlen = info & 0xffff, extra;
		int kflag = info >> 31;
		switch (kind) {
		case 1: case 14: case 17: extra = 4; break;            /* INT, VAR, DECL_TAG */
		case 3: extra = 12; break;                              /* ARRAY */
		case 4: case 5: case 15: case 19: extra = 12 * vlen; break; /* STRUCT UNION DATASEC ENUM64 */
		case 6: case 13: extra = 8 * vlen; break;               /* ENUM, FUNC_PROTO */
		default: extra = 0;
		}
		if (kind == 4 && name < str_len && !strcmp(strs + name, "sk_buff") && vlen) {
			for (uint32_t i = 0; i < vlen && pos + 12 + 12 * (i + 1) <= end; i++) {
				unsigned char *m = btf + pos + 12 + 12 * i;
				uint32_t mname = *(uint32_t *)m, moff = *(uint32_t *)(m + 8);
				if (mname < str_len && !strcmp(strs + mname, "data")) {
					if (kflag)
						moff &= 0xffffff;
					found = moff / 8;
				}
			}
			if (found >= 0)
				break;
		}
		pos += 12 + extra;
	}
out:
	free(btf);
	return found;
}

/* Field offsets of our event, from its format file. */
struct field { const char *name; int offset, size; };
static struct field fields[] = {
	{"qm", -1, 0}, {"hash", -1, 0}, {"l4", -1, 0}, {"len", -1, 0}, {"proto", -1, 0},
	{"hdr", -1, 0},
};
enum { F_QM, F_HASH, F_L4, F_LEN, F_PROTO, F_HDR, F_COUNT };
static int event_id;

static void read_format(void)
{
	char *fmt = read_file(TRACEFS "/events/" GROUP "/" EVENT "/format", NULL);
	char *line;
	if (!fmt)
		die("cannot read the probe's format: %s", strerror(errno));
	for (line = strtok(fmt, "\n"); line; line = strtok(NULL, "\n")) {
		int offset, size;
		char decl[128];
		if (sscanf(line, " ID: %d", &offset) == 1)
			event_id = offset;
		if (sscanf(line, " field:%127[^;]; offset:%d; size:%d;", decl, &offset, &size) != 3)
			continue;
		char *name = strrchr(decl, ' ');
		name = name ? name + 1 : decl;
		char *bracket = strchr(name, '[');
		if (bracket)
			*bracket = 0;
		for (int i = 0; i < F_COUNT; i++)
			if (!strcmp(name, fields[i].name)) {
				fields[i].offset = offset;
				fields[i].size = size;
			}
	}
	free(fmt);
	for (int i = 0; i < F_COUNT; i++)
		if (fields[i].offset < 0)
			die("the probe's format lacks field %s", fields[i].name);
	if (!event_id || fields[F_HDR].size != HDR_BYTES)
		die("the probe's format is not as created (id %d, hdr %d bytes)", event_id,
		    fields[F_HDR].size);
}

static uint64_t field_value(const unsigned char *data, int f)
{
	uint64_t v = 0;
	memcpy(&v, data + fields[f].offset, fields[f].size > 8 ? 8 : fields[f].size);
	return v;
}

static void hex(char *dst, const unsigned char *src, int n)
{
	static const char digits[] = "0123456789abcdef";
	for (int i = 0; i < n; i++) {
		dst[2 * i] = digits[src[i] >> 4];
		dst[2 * i + 1] = digits[src[i] & 15];
	}
	dst[2 * n] = 0;
}

#define F_FRAGMENT 1
#define F_EXT 2
#define F_SHORT 4
#define F_LATER_FRAGMENT 8

/* One frame: parse the L3 header bytes and emit its record. */
static void record(int cpu, const unsigned char *data, int size)
{
	if (fields[F_HDR].offset + HDR_BYTES > size)
		return;
	unsigned qm = (unsigned)field_value(data, F_QM);
	unsigned hash = (unsigned)field_value(data, F_HASH);
	unsigned l4 = field_value(data, F_L4) ? 1 : 0;
	unsigned len = (unsigned)field_value(data, F_LEN);
	unsigned proto = (unsigned)field_value(data, F_PROTO);
	const unsigned char *h = data + fields[F_HDR].offset;
	unsigned ethertype = proto & 0xffff; /* the tracepoint stores ntohs(skb->protocol) */
	unsigned avail = len < HDR_BYTES ? len : HDR_BYTES, off = 0, l3_len = len;
	unsigned version = 0, l4proto = 0, sport = 0, dport = 0, flags = 0, alen = 0, ports_at = 0;
	unsigned headers = 0;
	char src[33] = "-", dst[33] = "-";

	/* VLAN tags the driver left in place (no offload on virtio-net): up to two. */
	for (int i = 0; i < 2 && (ethertype == 0x8100 || ethertype == 0x88a8); i++) {
		if (off + 4 > avail) {
			flags |= F_SHORT;
			break;
		}
		ethertype = h[off + 2] << 8 | h[off + 3];
		off += 4;
		l3_len -= 4;
	}
	if (ethertype == 0x0800 && !(flags & F_SHORT)) {
		unsigned ihl;
		if (off + 20 > avail || (h[off] >> 4) != 4 || (ihl = (h[off] & 15) * 4) < 20) {
			flags |= F_SHORT;
		} else {
			unsigned frag = (h[off + 6] << 8 | h[off + 7]);
			version = 4;
			alen = 4;
			l4proto = h[off + 9];
			hex(src, h + off + 12, 4);
			hex(dst, h + off + 16, 4);
			if (frag & 0x3fff)
				flags |= F_FRAGMENT;
			if (frag & 0x1fff)
				flags |= F_LATER_FRAGMENT;
			ports_at = off + ihl;
		}
	} else if (ethertype == 0x86dd && !(flags & F_SHORT)) {
		if (off + 40 > avail || (h[off] >> 4) != 6) {
			flags |= F_SHORT;
		} else {
			unsigned next = h[off + 6], pos = off + 40;
			version = 6;
			alen = 16;
			hex(src, h + off + 8, 16);
			hex(dst, h + off + 24, 16);
			/* Extension headers: hop-by-hop, routing, destination options, fragment, AH. */
			while (next == 0 || next == 43 || next == 60 || next == 44 || next == 51) {
				unsigned hlen;
				flags |= F_EXT;
				if (pos + 8 > avail) {
					flags |= F_SHORT;
					break;
				}
				if (next == 44) {
					flags |= F_FRAGMENT;
					if ((h[pos + 2] << 8 | h[pos + 3]) & 0xfff8)
						flags |= F_LATER_FRAGMENT;
					hlen = 8;
				} else if (next == 51) {
					hlen = (h[pos + 1] + 2) * 4;
				} else {
					hlen = (h[pos + 1] + 1) * 8;
				}
				next = h[pos];
				pos += hlen;
			}
			l4proto = next;
			ports_at = pos;
		}
	}
	(void)alen;
	if (version && (l4proto == 6 || l4proto == 17) && !(flags & (F_SHORT | F_LATER_FRAGMENT))) {
		if (ports_at + 4 > avail) {
			flags |= F_SHORT;
		} else {
			sport = h[ports_at] << 8 | h[ports_at + 1];
			dport = h[ports_at + 2] << 8 | h[ports_at + 3];
			if (l4proto == 17)
				headers = ports_at - off + 8;
			else if (ports_at + 13 <= avail)
				headers = ports_at - off + (h[ports_at + 12] >> 4) * 4;
		}
	}
	emit("r %llu %d %u %08x %u %04x %u %u %u %u %u %s %s %x %u\n", seq++, cpu, qm, hash, l4,
	     ethertype, l3_len, version, l4proto, sport, dport, src, dst, flags, headers);
}

/* One page from trace_pipe_raw: header (timestamp u64, commit u64), then events. */
static void read_page(int cpu, const unsigned char *page, size_t size)
{
	uint64_t commit;
	size_t len, pos = 0;
	if (size < 16)
		return;
	memcpy(&commit, page + 8, 8);
	len = commit & 0xfffff;
	const unsigned char *d = page + 16;
	if (len > size - 16)
		len = size - 16;
	if (commit & (1u << 31)) {            /* RB_MISSED_EVENTS */
		long long lost = -1;
		if ((commit & (1u << 30)) && 16 + len + 8 <= size) /* RB_MISSED_STORED */
			memcpy(&lost, d + len, 8);
		emit("l %d %lld\n", cpu, lost);
	}
	while (pos + 4 <= len) {
		uint32_t head, type_len, length;
		memcpy(&head, d + pos, 4);
		type_len = head & 31;
		if (type_len == 29) {                    /* padding */
			if (!(head >> 5))
				break;                           /* the rest of the page */
			memcpy(&length, d + pos + 4, 4);
			pos += 4 + length;
		} else if (type_len == 30 || type_len == 31) { /* time extend, absolute stamp */
			pos += 8;
		} else if (type_len == 0) {
			if (pos + 8 > len)
				break;
			memcpy(&length, d + pos + 4, 4);
			if (length < 4 || pos + 4 + length > len)
				break;
			if (*(uint16_t *)(d + pos + 8) == event_id)
				record(cpu, d + pos + 8, (int)length - 4);
			pos += 4 + length;
		} else {
			length = type_len * 4;
			if (pos + 4 + length > len)
				break;
			if (*(uint16_t *)(d + pos + 4) == event_id)
				record(cpu, d + pos + 4, (int)length);
			pos += 4 + length;
		}
	}
}

static char *find_port(const char *name)
{
	static char path[300];
	DIR *dir = opendir("/sys/class/virtio-ports");
	struct dirent *entry;
	if (!dir)
		die("no /sys/class/virtio-ports (is virtio_console loaded?)");
	while ((entry = readdir(dir))) {
		char file[300];
		if (entry->d_name[0] == '.')
			continue;
		snprintf(file, sizeof file, "/sys/class/virtio-ports/%s/name", entry->d_name);
		char *text = read_file(file, NULL);
		if (text) {
			text[strcspn(text, "\n")] = 0;
			if (!strcmp(text, name)) {
				snprintf(path, sizeof path, "/dev/%s", entry->d_name);
				free(text);
				closedir(dir);
				return path;
			}
			free(text);
		}
	}
	closedir(dir);
	die("no virtio-serial port named %s", name);
	return NULL;
}

static void teardown(void)
{
	write_file(INSTANCE "/events/" GROUP "/" EVENT "/enable", "0", 0);
	rmdir(INSTANCE);
	write_file(TRACEFS "/dynamic_events", "-:" GROUP "/" EVENT "\n", 1);
}

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

int main(int argc, char **argv)
{
	const char *iface = "eth0", *port = "org.vnetbackend.records.0", *path = NULL;
	long data_off = -1, buffer_kb = 8192;
	int opt, ncpu, fds[MAX_CPUS];
	char cmd[512], file[300];
	struct utsname uts;
	static unsigned char page[PAGE];

	while ((opt = getopt(argc, argv, "i:o:p:d:b:")) != -1) {
		switch (opt) {
		case 'i': iface = optarg; break;
		case 'o': path = optarg; break;
		case 'p': port = optarg; break;
		case 'd': data_off = strtol(optarg, NULL, 0); break;
		case 'b': buffer_kb = strtol(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: %s [-i IFACE] [-o PATH | -p PORT_NAME] "
				"[-d SKB_DATA_OFFSET] [-b BUFFER_KB]\n", argv[0]);
			return 2;
		}
	}
	if (strlen(iface) > 15 || strpbrk(iface, "\"\\ "))
		die("bad interface name %s", iface);
	if (data_off < 0)
		data_off = skb_data_offset_from_btf();
	if (data_off < 0)
		die("no BTF offset for sk_buff.data in /sys/kernel/btf/vmlinux: give -d");
	if (!path)
		path = find_port(port);
	out_fd = open(path, O_WRONLY | O_CLOEXEC);
	if (out_fd < 0)
		die("open %s: %s", path, strerror(errno));

	teardown(); /* what an earlier run left */
	snprintf(cmd, sizeof cmd,
		 "e:" GROUP "/" EVENT " net.napi_gro_receive_entry qm=$queue_mapping hash=$hash "
		 "l4=$l4_hash len=$len proto=$protocol hdr=+0(+%ld($skbaddr)):u64[%d] "
		 "if name==\"%s\"\n", data_off, HDR_BYTES / 8, iface);
	if (write_file(TRACEFS "/dynamic_events", cmd, 1))
		die("cannot create the event probe (%s): %s; see %s/error_log", strerror(errno),
		    cmd, TRACEFS);
	read_format();
	if (mkdir(INSTANCE, 0700) && errno != EEXIST)
		die("mkdir %s: %s", INSTANCE, strerror(errno));
	snprintf(cmd, sizeof cmd, "%ld", buffer_kb);
	if (write_file(INSTANCE "/buffer_size_kb", cmd, 0) ||
	    write_file(INSTANCE "/buffer_percent", "0", 0) ||
	    write_file(INSTANCE "/events/" GROUP "/" EVENT "/enable", "1", 0))
		die("cannot set up the tracing instance: %s", strerror(errno));

	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGPIPE, SIG_IGN);
	ncpu = 0;
	for (int cpu = 0; cpu < MAX_CPUS; cpu++) {
		snprintf(file, sizeof file, INSTANCE "/per_cpu/cpu%d/trace_pipe_raw", cpu);
		int fd = open(file, O_RDONLY | O_NONBLOCK);
		if (fd < 0)
			break;
		fds[ncpu++] = fd;
	}
	if (!ncpu)
		die("no per-CPU buffers in %s", INSTANCE);
	uname(&uts);
	emit("h vnet-recorder 1 %s %s %ld\n", uts.release, iface, data_off);
	flush_out();

	int got = 0;
	while (!stopping) {
		int had = got;
		got = 0;
		for (int cpu = 0; cpu < ncpu; cpu++) {
			for (;;) {
				ssize_t n = read(fds[cpu], page, PAGE);
				if (n <= 0)
					break;
				got = 1;
				read_page(cpu, page, (size_t)n);
			}
		}
		/* A pass line after every pass that read something and after the one following
		 * it: once a frame's record is out, the second pass line after it proves every
		 * buffer was read again after that frame's buffer was. */
		if (got || had) {
			emit("p %llu\n", seq);
			flush_out();
			continue;
		}
		struct pollfd pfds[MAX_CPUS];
		for (int cpu = 0; cpu < ncpu; cpu++)
			pfds[cpu] = (struct pollfd){.fd = fds[cpu], .events = POLLIN};
		poll(pfds, (nfds_t)ncpu, 100);
	}
	flush_out();
	teardown();
	return 0;
}
