// SPDX-License-Identifier: MIT
/*
 * Tap steering program: virtio-net RSS with a per-packet hash report.
 *
 * Loaded by vnetbackend.steering (bcc) as a BPF_PROG_TYPE_SOCKET_FILTER and attached to a
 * multi-queue tap with TUNSETSTEERINGEBPF. It returns the receive queue index itself; tun
 * takes it modulo the number of enabled queues.
 *
 * The semantics are those of the reference model, vnetbackend/rss/frame.py and
 * vnetbackend/rss/config.py: read their docstrings for how the specification is read
 * (VLAN tags, fragments, IPv6 extension headers, the _EX types).
 *
 * The hash is table-driven: for each byte position i of the hash input the loader stores
 * toeplitz[i][v], the hash of byte value v at position i, so the hash of an input is the
 * XOR of one table entry per byte. Built with TOEPLITZ_BITWISE defined, the program hashes
 * bit by bit from the key instead (the benchmark's yardstick).
 *
 * Cost: every kernel function call is dear (each helper call is most of the cost of a
 * frame), so the frame is read through a window of WINDOW bytes: one read serves every
 * header of a common frame, and a frame is read again only where its headers go past it.
 * A frame whose ethertype is neither IP nor a VLAN tag computes nothing: it is told apart
 * before the window is read (see may_be_ip) and costs no map lookup beyond the control
 * word, the counters and the slot. A report is written into a ring of the CPU's own in
 * mapped memory, with no helper call unless the reader is to be woken (see report_slots).
 *
 * The map value and report structures are mirrored once in vnetbackend/steering/layout.py,
 * which also hands over the Python side's limits and numbers; both are checked at compile
 * time below. Change both sides.
 */

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/virtio_net.h>
#include <uapi/linux/filter.h>

#define MAX_KEY_SIZE 40
#define MAX_TABLE_LENGTH 128
#define MAX_HASH_INPUT 36
#define MAX_VLAN_TAGS 2
#define SLOT_COUNT 2

/* Report rings: one per possible CPU, REPORT_SLOTS records each (the loader sets both). */
#ifndef REPORT_CPUS
#define REPORT_CPUS 1
#endif
#ifndef REPORT_SLOTS
#define REPORT_SLOTS 4096
#endif

/* Bytes read from the frame at once (one helper call copies up to this many at the cost of
 * a few), the window's index mask, and the most bytes asked of it at once (an IPv6 header). */
#define WINDOW 112
#define WINDOW_MASK 127
#define MAX_ASK 40

/* BPF_PROG_TEST_RUN runs a socket filter on the loopback device (ifindex 1) with the
 * Ethernet header pulled; tun runs it on the tap, skb->data at the Ethernet header. */
#define LOOPBACK_IFINDEX 1

/*
 * One complete RSS configuration. The program reads the slot that `active_slot` names;
 * the loader writes the other slot and then flips `active_slot`, so a packet never sees
 * half of one configuration and half of another.
 */
struct rss_slot {
	u32 enabled;            /* 0: RSS off, every frame gets queue 0 and no hash */
	u32 redirect;           /* 0: hash and report only, queue = unclassified_queue */
	u32 hash_types;         /* VIRTIO_NET_RSS_HASH_TYPE_* mask */
	u32 table_length;       /* indirection table length, a power of two */
	u32 unclassified_queue;
	u32 queues;             /* receive queues in use (kept for reading the config back) */
	u32 key_length;
	u32 generation;         /* the loader's count of slot switches when it wrote this one */
	u8 key[MAX_KEY_SIZE];   /* the key the tables were built from, zero past key_length */
	u16 indirection[MAX_TABLE_LENGTH]; /* queues as the tap delivers them (see the loader) */
	u32 toeplitz[MAX_HASH_INPUT][256];
};

struct steering_control {
	u32 active_slot;
	u32 report_every;       /* 0: no reports; N: one report every N frames (per CPU) */
};

struct steering_counters {
	u64 frames;             /* frames the program ran on */
	u64 reports;            /* reports written to the report ring */
	u64 reports_dropped;    /* reports lost because the report ring was full */
	u64 until_report;       /* frames to skip before the next sampled report */
};

/*
 * Where a CPU's report ring stands. The program writes a record into slot head % REPORT_SLOTS
 * of its CPU and then advances `head`; the reader reads up to `head` and then advances `tail`.
 * Both only grow. They sit on separate cache lines, each written by one side only.
 */
struct report_cursor {
	u64 head;               /* reports written on this CPU (the program's) */
	u64 head_line[7];
	u64 tail;               /* reports read (the reader's) */
	u64 tail_line[7];
};

#define REPORT_FLAG_EXT_HEADERS 1
#define REPORT_FLAG_FRAGMENT 2
#define REPORT_FLAG_EX_SRC 4    /* the hash took ex_src (home address) for the source */
#define REPORT_FLAG_EX_DST 8    /* the hash took ex_dst (type 2 routing) for the destination */

/*
 * One record of a report ring. Ports are host order; addresses network order.
 * Only the address bytes the IP version uses are written (none for frames that are not IP);
 * the rest of `src` and `dst` is left as the slot had it. `ex_src`/`ex_dst` are written only
 * when REPORT_FLAG_EX_SRC/REPORT_FLAG_EX_DST say the hash took them. With `l4_proto`, the
 * flags and the ports, a record holds the hash input exactly as the program used it, and
 * `generation` names the configuration (slot) that steered the frame.
 */
struct steering_report {
	u32 hash;
	u16 queue;
	u8 report_type;         /* VIRTIO_NET_HASH_REPORT_* */
	u8 ip_version;          /* 0 for frames that are not IP (or unreadable) */
	u8 l4_proto;            /* 6 or 17 when the transport header counts, else 0 */
	u8 flags;               /* REPORT_FLAG_* */
	u16 l3_offset;
	u32 frame_len;
	u32 l3_len;             /* frame_len - l3_offset for IP frames, else 0 */
	u16 src_port;
	u16 dst_port;
	u8 src[16];             /* IPv4 addresses use the first 4 bytes */
	u8 dst[16];
	u8 ex_src[16];
	u8 ex_dst[16];
	u32 generation;         /* rss_slot.generation of the slot that steered the frame */
	u32 pad;                /* records stay 8-byte aligned */
};

/*
 * The loader passes the Python mirror's layout as LAYOUT_<struct>_<field> (offsets) and
 * LAYOUT_<struct>_size; a mismatch stops the program from compiling.
 */
#define SAME_OFFSET(S, F)                                                     \
	_Static_assert(__builtin_offsetof(struct S, F) == LAYOUT_##S##_##F,   \
		       "layout.py disagrees on " #S "." #F)
#define SAME_SIZE(S)                                                          \
	_Static_assert(sizeof(struct S) == LAYOUT_##S##_size,                 \
		       "layout.py disagrees on the size of " #S)

SAME_SIZE(rss_slot);
SAME_OFFSET(rss_slot, enabled);
SAME_OFFSET(rss_slot, redirect);
SAME_OFFSET(rss_slot, hash_types);
SAME_OFFSET(rss_slot, table_length);
SAME_OFFSET(rss_slot, unclassified_queue);
SAME_OFFSET(rss_slot, queues);
SAME_OFFSET(rss_slot, key_length);
SAME_OFFSET(rss_slot, generation);
SAME_OFFSET(rss_slot, key);
SAME_OFFSET(rss_slot, indirection);
SAME_OFFSET(rss_slot, toeplitz);
SAME_SIZE(steering_control);
SAME_OFFSET(steering_control, active_slot);
SAME_OFFSET(steering_control, report_every);
SAME_SIZE(steering_counters);
SAME_OFFSET(steering_counters, frames);
SAME_OFFSET(steering_counters, reports);
SAME_OFFSET(steering_counters, reports_dropped);
SAME_OFFSET(steering_counters, until_report);
SAME_SIZE(report_cursor);
SAME_OFFSET(report_cursor, head);
SAME_OFFSET(report_cursor, head_line);
SAME_OFFSET(report_cursor, tail);
SAME_OFFSET(report_cursor, tail_line);
SAME_SIZE(steering_report);
SAME_OFFSET(steering_report, hash);
SAME_OFFSET(steering_report, queue);
SAME_OFFSET(steering_report, report_type);
SAME_OFFSET(steering_report, ip_version);
SAME_OFFSET(steering_report, l4_proto);
SAME_OFFSET(steering_report, flags);
SAME_OFFSET(steering_report, l3_offset);
SAME_OFFSET(steering_report, frame_len);
SAME_OFFSET(steering_report, l3_len);
SAME_OFFSET(steering_report, src_port);
SAME_OFFSET(steering_report, dst_port);
SAME_OFFSET(steering_report, src);
SAME_OFFSET(steering_report, dst);
SAME_OFFSET(steering_report, ex_src);
SAME_OFFSET(steering_report, ex_dst);
SAME_OFFSET(steering_report, generation);
SAME_OFFSET(steering_report, pad);

/*
 * The loader also passes the Python side's value of every constant the two share as
 * PY_<name>: the program's limits and flags, and the uapi numbers the reference model
 * (vnetbackend/rss) keeps its own copy of.
 */
#define SAME_VALUE(NAME) _Static_assert(NAME == PY_##NAME, "Python disagrees on " #NAME)

SAME_VALUE(MAX_KEY_SIZE);
SAME_VALUE(MAX_TABLE_LENGTH);
SAME_VALUE(MAX_HASH_INPUT);
SAME_VALUE(MAX_VLAN_TAGS);
SAME_VALUE(SLOT_COUNT);
SAME_VALUE(REPORT_FLAG_EXT_HEADERS);
SAME_VALUE(REPORT_FLAG_FRAGMENT);
SAME_VALUE(REPORT_FLAG_EX_SRC);
SAME_VALUE(REPORT_FLAG_EX_DST);
SAME_VALUE(ETH_HLEN);
SAME_VALUE(ETH_P_IP);
SAME_VALUE(ETH_P_IPV6);
SAME_VALUE(ETH_P_8021Q);
SAME_VALUE(ETH_P_8021AD);
SAME_VALUE(IPPROTO_HOPOPTS);
SAME_VALUE(IPPROTO_TCP);
SAME_VALUE(IPPROTO_UDP);
SAME_VALUE(IPPROTO_ROUTING);
SAME_VALUE(IPPROTO_FRAGMENT);
SAME_VALUE(IPPROTO_AH);
SAME_VALUE(IPPROTO_DSTOPTS);
SAME_VALUE(IPV6_TLV_HAO);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_IPv4);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_TCPv4);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_UDPv4);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_IPv6);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_TCPv6);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_UDPv6);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_IP_EX);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_TCP_EX);
SAME_VALUE(VIRTIO_NET_RSS_HASH_TYPE_UDP_EX);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_NONE);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_IPv4);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_TCPv4);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_UDPv4);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_IPv6);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_TCPv6);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_UDPv6);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_IPv6_EX);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_TCPv6_EX);
SAME_VALUE(VIRTIO_NET_HASH_REPORT_UDPv6_EX);

/* The indirection lookup masks its index with MAX_TABLE_LENGTH - 1. */
_Static_assert((MAX_TABLE_LENGTH & (MAX_TABLE_LENGTH - 1)) == 0,
	       "MAX_TABLE_LENGTH must be a power of two");
_Static_assert(REPORT_SLOTS > 0 && (REPORT_SLOTS & (REPORT_SLOTS - 1)) == 0,
	       "REPORT_SLOTS must be a power of two");
/* A read of up to MAX_ASK bytes fits in the window, and its masked index inside it. */
_Static_assert(MAX_ASK <= WINDOW && WINDOW <= WINDOW_MASK + 1 &&
	       (WINDOW_MASK & (WINDOW_MASK + 1)) == 0, "window sizes");

/* What a frame offers to the hash (ParsedFrame in the reference model). */
struct parsed {
	u64 frame_len;
	u16 l3_offset;
	u8 ip_version;
	u8 l4_proto;
	u8 has_ext;
	u8 fragment;
	u8 has_home;
	u8 has_routed;
	u8 ports[4];
	u32 align;              /* the addresses start 8-byte aligned */
	u8 src[16];
	u8 dst[16];
	u8 home[16];            /* ex_src when has_home */
	u8 routed[16];          /* ex_dst when has_routed */
};

/* Where the IPv6 extension chain walk is: the next header, and the destination options
 * still to look through for the home address option (none when opt >= opt_end). */
struct walk {
	u64 pos;                /* frame offset of header `nh` */
	u64 opt;
	u64 opt_end;
	u8 nh;
};

/*
 * Per-CPU working memory for one frame: the frame as read so far and what it holds. tun
 * steers with bottom halves off, so no other frame on the CPU runs the program meanwhile.
 */
struct scratch {
	struct parsed p;
	struct walk w;
	u64 base;               /* frame offset of skb->data: ETH_HLEN in a test run, else 0 */
	u64 win_start;          /* frame offset of win[0] */
	u64 win_len;            /* bytes in win */
	u8 win[WINDOW_MASK + 1 + MAX_ASK];
};

/* The loader writes the slots and the control word through their mapping in its memory. */
BPF_F_TABLE("array", u32, struct rss_slot, rss_slots, SLOT_COUNT, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct steering_control, control, 1, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(counters, struct steering_counters, 1);
BPF_PERCPU_ARRAY(scratch, struct scratch, 1);
/*
 * Reports: each CPU writes its own ring of `report_slots` (REPORT_SLOTS records from index
 * cpu * REPORT_SLOTS), both maps mapped into the reader's memory. Writing a record there
 * costs plain stores and one atomic add, where a record of a BPF ring buffer costs two
 * helper calls. The BPF ring buffer `report_bell` only wakes a reader that has read
 * everything (and may be waiting on its fd): it gets one 8-byte record whenever a CPU
 * writes a report while its ring's tail equals the report's position.
 */
BPF_F_TABLE("array", u32, struct report_cursor, report_cursors, REPORT_CPUS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct steering_report, report_slots, REPORT_CPUS * REPORT_SLOTS,
	    BPF_F_MMAPABLE);
BPF_RINGBUF_OUTPUT(report_bell, 1);

/* Make the compiler forget what it knows of `x`, so that a bound checked after this is
 * the bound the verifier sees. */
#define FORGET(x) asm volatile("" : "+r"(x))

/*
 * Copy `len` (1..WINDOW) bytes from frame offset `off`. Past the Ethernet header on a tap,
 * relative to skb->data, which also reaches paged data; in a test run, where the Ethernet
 * header is pulled, relative to the MAC header (a test run's skb is linear).
 */
static __always_inline int read_frame(struct __sk_buff *skb, const struct scratch *sc, u64 off,
				      u8 *to, u64 len)
{
	if (sc->base)
		return bpf_skb_load_bytes_relative(skb, off, to, len, BPF_HDR_START_MAC);
	return bpf_skb_load_bytes(skb, off, to, len);
}

/*
 * The frame's bytes [off, off + len) (len <= MAX_ASK), which the caller has checked are
 * inside the frame, or NULL if they cannot be read. Unless they are in the window already,
 * the window is read again from `off`: WINDOW bytes, or up to the frame's end.
 */
static __always_inline const u8 *frame_bytes(struct __sk_buff *skb, struct scratch *sc, u64 off,
					     u64 len)
{
	u64 n;

	if (off < sc->win_start || off - sc->win_start + len > sc->win_len) {
		n = sc->p.frame_len - off;
		if (n > WINDOW)
			n = WINDOW;
		FORGET(n);
		n &= WINDOW_MASK;
		if (n == 0 || read_frame(skb, sc, off, sc->win, n) < 0)
			return NULL;
		sc->win_start = off;
		sc->win_len = n;
	}
	return &sc->win[(off - sc->win_start) & WINDOW_MASK];
}

/*
 * The verifier's may_goto (Linux 6.9): false until the kernel's budget of loop iterations is
 * spent. A loop that tests it is verified until its state repeats, not once per iteration,
 * so the extension chain walk needs no bound of its own: every step consumes at least a
 * byte, and the walk ends with the frame. clang 14 has no mnemonic for it: the three
 * instructions are `may_goto +1; goto +1; spent = 1`.
 */
static __always_inline int loop_budget_spent(void)
{
	u64 spent = 0;

	asm volatile(".byte 0xe5, 0, 1, 0, 0, 0, 0, 0\n\t"
		     ".byte 0x05, 0, 1, 0, 0, 0, 0, 0\n\t"
		     "%[spent] = 1"
		     : [spent] "+r"(spent));
	return spent;
}

/*
 * Copies of addresses and ports, in words: clang copies a byte array byte by byte. The
 * words may be unaligned in the window; the verifier allows that in map values (the
 * window and the report slots are) on a host with efficient unaligned access (x86).
 */
static __always_inline void copy4(u8 *to, const u8 *from)
{
	*(u32 *)to = *(const u32 *)from;
}

static __always_inline void copy16(u8 *to, const u8 *from)
{
	((u64 *)to)[0] = ((const u64 *)from)[0];
	((u64 *)to)[1] = ((const u64 *)from)[1];
}

/* The extension headers the walk steps over, as bits of their numbers (all below 64). */
#define EXT_HEADERS ((1ULL << IPPROTO_HOPOPTS) | (1ULL << IPPROTO_ROUTING) |          \
		     (1ULL << IPPROTO_FRAGMENT) | (1ULL << IPPROTO_AH) | (1ULL << IPPROTO_DSTOPTS))
_Static_assert(IPPROTO_HOPOPTS < 64 && IPPROTO_ROUTING < 64 && IPPROTO_FRAGMENT < 64 &&
	       IPPROTO_AH < 64 && IPPROTO_DSTOPTS < 64, "extension header numbers");

static __always_inline int is_ext_header(u8 nh)
{
	return nh < 64 && ((EXT_HEADERS >> nh) & 1);
}

/* The transport header at `off`, if it is TCP or UDP and whole in the frame. */
static __always_inline void parse_transport(struct __sk_buff *skb, struct scratch *sc, u8 proto,
					    u64 off)
{
	struct parsed *p = &sc->p;
	const u8 *ports;
	u64 need;

	if (proto == IPPROTO_TCP)
		need = 20;
	else if (proto == IPPROTO_UDP)
		need = 8;
	else
		return;
	if (p->frame_len < off + need || !(ports = frame_bytes(skb, sc, off, 4)))
		return;
	copy4(p->ports, ports);
	p->l4_proto = proto;
}

static __always_inline void parse_ipv4(struct __sk_buff *skb, struct scratch *sc, u64 off)
{
	struct parsed *p = &sc->p;
	const u8 *h;
	u64 ihl;
	u8 proto;

	if (p->frame_len < off + 20 || !(h = frame_bytes(skb, sc, off, 20)) || (h[0] >> 4) != 4)
		return;
	ihl = (h[0] & 0x0F) * 4;
	if (ihl < 20 || p->frame_len < off + ihl)
		return;
	p->ip_version = 4;
	p->l3_offset = off;
	copy4(p->src, &h[12]);
	copy4(p->dst, &h[16]);
	if (((h[6] << 8) | h[7]) & 0x3FFF) {
		p->fragment = 1;
		return;
	}
	proto = h[9];
	parse_transport(skb, sc, proto, off + ihl);
}

/*
 * One destination option at w->opt: its length, or the home address option itself. A
 * last byte alone is Pad1 or a truncated option: the scan ends either way, so an option
 * is read as its two first bytes at once.
 */
static __always_inline void scan_option(struct __sk_buff *skb, struct scratch *sc)
{
	struct walk *w = &sc->w;
	u64 opt = w->opt;
	const u8 *o;
	u8 type, length;

	if (opt + 2 > w->opt_end || !(o = frame_bytes(skb, sc, opt, 2))) {
		w->opt_end = 0;
		return;
	}
	type = o[0];
	length = o[1];
	if (type == IPV6_TLV_PAD1) {
		w->opt = opt + 1;
		return;
	}
	if (type == IPV6_TLV_HAO && length == 16 && opt + 18 <= w->opt_end) {
		if ((o = frame_bytes(skb, sc, opt + 2, 16))) {
			copy16(sc->p.home, o);
			sc->p.has_home = 1;
		}
		w->opt_end = 0;
		return;
	}
	w->opt = opt + 2 + length;
}

/* One step of the extension chain walk; 1 when the walk is over. */
static __always_inline int walk_step(struct __sk_buff *skb, struct scratch *sc)
{
	struct parsed *p = &sc->p;
	struct walk *w = &sc->w;
	u64 pos = w->pos, length;
	u8 nh = w->nh, next, routing2;
	const u8 *e;

	if (w->opt < w->opt_end) {
		scan_option(skb, sc);
		return 0;
	}
	if (!is_ext_header(nh)) {
		if (!p->fragment)
			parse_transport(skb, sc, nh, pos);
		return 1;
	}
	p->has_ext = 1;
	if (p->frame_len < pos + 8 || !(e = frame_bytes(skb, sc, pos, 8)))
		return 1;
	next = e[0];
	if (nh == IPPROTO_FRAGMENT) {
		length = 8;
		if (((e[2] << 8) | e[3]) & 0xFFF9)
			p->fragment = 1;
	} else if (nh == IPPROTO_AH) {
		length = (e[1] + 2) * 4;
	} else {
		length = (e[1] + 1) * 8;
	}
	routing2 = nh == IPPROTO_ROUTING && e[2] == 2 && e[1] == 2;
	if (p->frame_len < pos + length)
		return 1;
	if (routing2 && !p->has_routed) {
		if ((e = frame_bytes(skb, sc, pos + 8, 16))) {
			copy16(p->routed, e);
			p->has_routed = 1;
		}
	} else if (nh == IPPROTO_DSTOPTS && !p->has_home) {
		w->opt = pos + 2;
		w->opt_end = pos + length;
	}
	w->nh = next;
	w->pos = pos + length;
	return 0;
}

static __always_inline void parse_ipv6(struct __sk_buff *skb, struct scratch *sc, u64 off)
{
	struct parsed *p = &sc->p;
	const u8 *h;

	if (p->frame_len < off + 40 || !(h = frame_bytes(skb, sc, off, 40)) || (h[0] >> 4) != 6)
		return;
	p->ip_version = 6;
	p->l3_offset = off;
	copy16(p->src, &h[8]);
	copy16(p->dst, &h[24]);
	sc->w.nh = h[6];
	sc->w.pos = off + 40;
	sc->w.opt_end = 0;
	for (;;) {
		/* Each pass starts from the walk's state in memory, not from what the compiler
		 * kept of the last pass, so the verifier sees every pass alike. Two steps a
		 * pass: the second goes on from the first's state in registers. */
		asm volatile("" ::: "memory");
		if (loop_budget_spent() || walk_step(skb, sc) || walk_step(skb, sc))
			break;
	}
}

/*
 * Up to two VLAN tags, then IPv4 or IPv6. `oob_tags` (0 or 1) is a tag the skb carries out
 * of band; it counts against the two.
 */
static __always_inline void parse_frame(struct __sk_buff *skb, struct scratch *sc, u32 oob_tags)
{
	u64 off = ETH_HLEN;
	const u8 *b;
	u16 ethertype;

	if (sc->p.frame_len < ETH_HLEN || !(b = frame_bytes(skb, sc, ETH_HLEN - 2, 2)))
		return;
	ethertype = (b[0] << 8) | b[1];
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD)
			break;
		if (i + oob_tags >= MAX_VLAN_TAGS || sc->p.frame_len < off + 4 ||
		    !(b = frame_bytes(skb, sc, off + 2, 2)))
			return;
		ethertype = (b[0] << 8) | b[1];
		off += 4;
	}
	if (ethertype == ETH_P_IP)
		parse_ipv4(skb, sc, off);
	else if (ethertype == ETH_P_IPV6)
		parse_ipv6(skb, sc, off);
}

#ifdef TOEPLITZ_BITWISE
/* QEMU's algorithm: for every set bit of the input, XOR in the key's 32-bit window that
 * starts at that bit; the window slides one key bit per input bit. */
#define HASH_BYTES(slot, data, pos, n)                                        \
	({                                                                    \
		const u8 *k_ = &(slot)->key[(pos)];                           \
		u32 h_ = 0;                                                   \
		u32 w_ = (k_[0] << 24) | (k_[1] << 16) | (k_[2] << 8) | k_[3];\
		for (int i_ = 0; i_ < (n); i_++)                              \
			for (int b_ = 7; b_ >= 0; b_--) {                     \
				if (((data)[i_] >> b_) & 1)                   \
					h_ ^= w_;                             \
				w_ = (w_ << 1) | ((k_[i_ + 4] >> b_) & 1);    \
			}                                                     \
		h_;                                                           \
	})
#else
/*
 * XOR of one table entry per input byte: the Toeplitz hash of data at input position pos.
 * The barrier after every fourth byte keeps clang from loading every byte and computing
 * every entry's address before the first lookup: BPF has ten registers, so it spilled the
 * addresses to the stack, and an IPv6 frame cost about a tenth more in all.
 */
#define HASH_BYTES(slot, data, pos, n)                                        \
	({                                                                    \
		u32 h_ = 0;                                                   \
		_Pragma("unroll") for (int i_ = 0; i_ < (n); i_++) {          \
			h_ ^= (slot)->toeplitz[(pos) + i_][(data)[i_]];       \
			if (i_ % 4 == 3)                                      \
				asm volatile("" ::: "memory");                \
		}                                                             \
		h_;                                                           \
	})
#endif

struct selection {
	u32 hash;
	u8 report;
	u8 ex_flags;            /* REPORT_FLAG_EX_SRC / REPORT_FLAG_EX_DST */
};

static __always_inline void select_ipv4(const struct rss_slot *s, const struct parsed *p,
					u32 types, struct selection *out)
{
	u8 report;

	if ((types & VIRTIO_NET_RSS_HASH_TYPE_TCPv4) && p->l4_proto == IPPROTO_TCP)
		report = VIRTIO_NET_HASH_REPORT_TCPv4;
	else if ((types & VIRTIO_NET_RSS_HASH_TYPE_UDPv4) && p->l4_proto == IPPROTO_UDP)
		report = VIRTIO_NET_HASH_REPORT_UDPv4;
	else if (types & VIRTIO_NET_RSS_HASH_TYPE_IPv4)
		report = VIRTIO_NET_HASH_REPORT_IPv4;
	else
		return;
	out->report = report;
	out->hash = HASH_BYTES(s, p->src, 0, 4) ^ HASH_BYTES(s, p->dst, 4, 4);
	if (report != VIRTIO_NET_HASH_REPORT_IPv4)
		out->hash ^= HASH_BYTES(s, p->ports, 8, 4);
}

/* The report for an IPv6 frame, or VIRTIO_NET_HASH_REPORT_NONE; `ex` picks the _EX rules. */
static __always_inline u8 ipv6_report(const struct parsed *p, u32 types, int ex)
{
	u32 tcp = ex ? VIRTIO_NET_RSS_HASH_TYPE_TCP_EX : VIRTIO_NET_RSS_HASH_TYPE_TCPv6;
	u32 udp = ex ? VIRTIO_NET_RSS_HASH_TYPE_UDP_EX : VIRTIO_NET_RSS_HASH_TYPE_UDPv6;
	u32 ip = ex ? VIRTIO_NET_RSS_HASH_TYPE_IP_EX : VIRTIO_NET_RSS_HASH_TYPE_IPv6;

	if ((types & tcp) && p->l4_proto == IPPROTO_TCP)
		return ex ? VIRTIO_NET_HASH_REPORT_TCPv6_EX : VIRTIO_NET_HASH_REPORT_TCPv6;
	if ((types & udp) && p->l4_proto == IPPROTO_UDP)
		return ex ? VIRTIO_NET_HASH_REPORT_UDPv6_EX : VIRTIO_NET_HASH_REPORT_UDPv6;
	if (types & ip)
		return ex ? VIRTIO_NET_HASH_REPORT_IPv6_EX : VIRTIO_NET_HASH_REPORT_IPv6;
	return VIRTIO_NET_HASH_REPORT_NONE;
}

static __always_inline void select_ipv6(const struct rss_slot *s, const struct parsed *p,
					u32 types, struct selection *out)
{
	const u8 *src = p->src;
	const u8 *dst = p->dst;
	u8 report = VIRTIO_NET_HASH_REPORT_NONE;

	if (p->has_ext) {
		report = ipv6_report(p, types, 1);
		if (report != VIRTIO_NET_HASH_REPORT_NONE) {
			if (p->has_home) {
				src = p->home;
				out->ex_flags |= REPORT_FLAG_EX_SRC;
			}
			if (p->has_routed) {
				dst = p->routed;
				out->ex_flags |= REPORT_FLAG_EX_DST;
			}
		}
	}
	if (report == VIRTIO_NET_HASH_REPORT_NONE)
		report = ipv6_report(p, types, 0);
	if (report == VIRTIO_NET_HASH_REPORT_NONE)
		return;
	out->report = report;
	out->hash = HASH_BYTES(s, src, 0, 16) ^ HASH_BYTES(s, dst, 16, 16);
	if (report != VIRTIO_NET_HASH_REPORT_IPv6 && report != VIRTIO_NET_HASH_REPORT_IPv6_EX)
		out->hash ^= HASH_BYTES(s, p->ports, 32, 4);
}

/*
 * Whether this frame is the one in `report_every` that gets a report (per CPU). A countdown
 * left from a sparser sampling does not delay a denser one.
 */
static __always_inline int report_due(const struct steering_control *ctl,
				      struct steering_counters *cnt)
{
	u32 every = ctl->report_every;

	if (!every)
		return 0;
	if (cnt->until_report == 0 || cnt->until_report >= every) {
		cnt->until_report = every - 1;
		return 1;
	}
	cnt->until_report--;
	return 0;
}

/*
 * The slot for this CPU's next report, or NULL when its ring is full (the reader has not
 * read REPORT_SLOTS reports yet). `*cursor` and `*head` are what publish_report needs.
 */
static __always_inline struct steering_report *report_slot(struct report_cursor **cursor,
							   u64 *head)
{
	u32 cpu = bpf_get_smp_processor_id();
	struct report_cursor *c = report_cursors.lookup(&cpu);
	u32 index;
	u64 h;

	if (!c)
		return NULL;
	h = c->head;
	if (h - *(volatile u64 *)&c->tail >= REPORT_SLOTS)
		return NULL;
	index = cpu * REPORT_SLOTS + (u32)(h & (REPORT_SLOTS - 1));
	*cursor = c;
	*head = h;
	return report_slots.lookup(&index);
}

/*
 * Make the report in slot `head` visible: the record's stores come first (the compiler keeps
 * them before the atomic add; x86 keeps stores in order), then `head` moves. The atomic add
 * is a full barrier on x86, so the tail read after it is no older than the add: either the
 * reader, re-reading `head` after it advanced `tail` (with a barrier too), sees this report,
 * or this sees the reader's tail at `head` and rings the bell. No wake-up is lost.
 */
static __always_inline void publish_report(struct report_cursor *c, u64 head)
{
	u64 bell = head;

	asm volatile("" ::: "memory");
	__sync_fetch_and_add(&c->head, 1);
	if (*(volatile u64 *)&c->tail == head)
		report_bell.ringbuf_output(&bell, sizeof(bell), 0);
}

/*
 * The first 24 bytes of a record as three little-endian words: hash, queue, report_type,
 * ip_version | l4_proto, flags, l3_offset, frame_len | l3_len, src_port, dst_port.
 */
#define REPORT_HEAD(r) ((u64 *)(r))
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "records are written as LE words");
_Static_assert(__builtin_offsetof(struct steering_report, queue) == 4 &&
	       __builtin_offsetof(struct steering_report, report_type) == 6 &&
	       __builtin_offsetof(struct steering_report, ip_version) == 7 &&
	       __builtin_offsetof(struct steering_report, l4_proto) == 8 &&
	       __builtin_offsetof(struct steering_report, flags) == 9 &&
	       __builtin_offsetof(struct steering_report, l3_offset) == 10 &&
	       __builtin_offsetof(struct steering_report, frame_len) == 12 &&
	       __builtin_offsetof(struct steering_report, l3_len) == 16 &&
	       __builtin_offsetof(struct steering_report, src_port) == 20 &&
	       __builtin_offsetof(struct steering_report, dst_port) == 22,
	       "REPORT_HEAD's word layout");

/*
 * A report reserved before the frame is parsed: its slot (NULL when none is due or the ring
 * is full) and what publish_report needs. The slot's two cache lines are written at once,
 * so that fetching them overlaps the parse rather than stalling the atomic add that
 * publishes the record (a locked instruction waits for every store before it).
 */
struct reservation {
	struct steering_report *r;
	struct report_cursor *c;
	u64 head;
};

static __always_inline void reserve_report(struct reservation *res, u32 generation,
					   struct steering_counters *cnt)
{
	struct steering_report *r = report_slot(&res->c, &res->head);

	if (!r || !res->c) {
		cnt->reports_dropped++;
		return;
	}
	r->hash = 0;
	r->generation = generation;
	res->r = r;
}

static __always_inline void write_report(const struct parsed *p, const struct selection *sel,
					 u32 queue, struct reservation *res,
					 struct steering_counters *cnt)
{
	struct steering_report *r = res->r;
	u64 flags, l3_offset = 0, l3_len = 0, ports = 0;

	if (!r || !res->c)
		return;
	flags = (p->has_ext ? REPORT_FLAG_EXT_HEADERS : 0) |
		(p->fragment ? REPORT_FLAG_FRAGMENT : 0) | sel->ex_flags;
	if (p->ip_version) {
		l3_offset = p->l3_offset;
		l3_len = (u32)(p->frame_len - p->l3_offset);
	}
	if (p->l4_proto) {
		/* Both ports from network to host order at once. */
		ports = *(const u32 *)p->ports;
		ports = ((ports & 0x00FF00FF) << 8) | ((ports >> 8) & 0x00FF00FF);
	}
	/* The record's first 24 bytes in three stores (see REPORT_HEAD). */
	REPORT_HEAD(r)[0] = sel->hash | (u64)(u16)queue << 32 | (u64)sel->report << 48 |
			    (u64)p->ip_version << 56;
	REPORT_HEAD(r)[1] = p->l4_proto | flags << 8 | l3_offset << 16 |
			    (u64)(u32)p->frame_len << 32;
	REPORT_HEAD(r)[2] = l3_len | ports << 32;
	if (p->ip_version == 4) {
		copy4(r->src, p->src);
		copy4(r->dst, p->dst);
	} else if (p->ip_version == 6) {
		copy16(r->src, p->src);
		copy16(r->dst, p->dst);
		if (sel->ex_flags & REPORT_FLAG_EX_SRC)
			copy16(r->ex_src, p->home);
		if (sel->ex_flags & REPORT_FLAG_EX_DST)
			copy16(r->ex_dst, p->routed);
	}
	publish_report(res->c, res->head);
	cnt->reports++;
}

/* The report of a frame that is not IP: no hash, no addresses. */
static __always_inline void write_plain_report(u32 frame_len, u32 queue, u32 generation,
					       struct steering_counters *cnt)
{
	struct report_cursor *c = NULL;
	u64 head = 0;
	struct steering_report *r = report_slot(&c, &head);

	if (!r || !c) {
		cnt->reports_dropped++;
		return;
	}
	r->hash = 0;
	r->queue = queue;
	r->report_type = VIRTIO_NET_HASH_REPORT_NONE;
	r->ip_version = 0;
	r->l4_proto = 0;
	r->flags = 0;
	r->l3_offset = 0;
	r->frame_len = frame_len;
	r->generation = generation;
	r->l3_len = 0;
	r->src_port = 0;
	r->dst_port = 0;
	publish_report(c, head);
	cnt->reports++;
}

static __always_inline int may_start_ip(u32 ethertype)
{
	return ethertype == ETH_P_IP || ethertype == ETH_P_IPV6 || ethertype == ETH_P_8021Q ||
	       ethertype == ETH_P_8021AD;
}

/*
 * Whether the frame's outer ethertype is IPv4, IPv6 or a VLAN tag: if not, the frame
 * computes nothing and is not read further. skb->protocol, which the sender sets, only
 * saves the look at the frame when it names one of those (then the frame is parsed, which
 * reads the ethertype anyway); otherwise the ethertype is read with one load (LD_ABS, much
 * cheaper than a copy into the window). An LD_ABS that fails ends the program, so it is
 * only used on frames holding a whole Ethernet header.
 */
static __always_inline int may_be_ip(struct __sk_buff *skb, u32 base, u32 frame_len)
{
	u32 ethertype;

	if (frame_len < ETH_HLEN)
		return 0;
	if (may_start_ip(bpf_ntohs(skb->protocol)))
		return 1;
	if (base)
		ethertype = load_half(skb, SKF_LL_OFF + ETH_HLEN - 2);
	else
		ethertype = load_half(skb, ETH_HLEN - 2);
	return may_start_ip(ethertype);
}

int steer(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct steering_control *ctl = control.lookup(&zero);
	struct steering_counters *cnt = counters.lookup(&zero);
	struct scratch *sc;
	struct parsed *p;
	struct rss_slot *s;
	struct selection sel = {};
	struct reservation res = {};
	u32 slot, base, frame_len, oob_tags, types, queue;

	if (!ctl || !cnt)
		return 0;
	cnt->frames++;
	slot = ctl->active_slot % SLOT_COUNT;
	s = rss_slots.lookup(&slot);
	if (!s)
		return 0;

	base = skb->ifindex == LOOPBACK_IFINDEX ? ETH_HLEN : 0;
	frame_len = skb->len + base;
	/*
	 * A VLAN tag the stack keeps out of band (tx-vlan-offload of the tap) is not in the
	 * data; tun writes it into the frame after the MAC addresses. Parse the data, then
	 * give lengths and offsets as in the frame the guest gets.
	 */
	oob_tags = skb->vlan_present ? 1 : 0;
	if (!may_be_ip(skb, base, frame_len)) {
		queue = s->enabled ? s->unclassified_queue : 0;
		if (report_due(ctl, cnt))
			write_plain_report(frame_len + 4 * oob_tags, queue, s->generation, cnt);
		return queue;
	}

	if (report_due(ctl, cnt))
		reserve_report(&res, s->generation, cnt);
	sc = scratch.lookup(&zero);
	if (!sc)
		return 0;
	p = &sc->p;
	sc->base = base;
	sc->win_start = 0;
	sc->win_len = 0;
	p->frame_len = frame_len;
	p->ip_version = 0;
	p->l4_proto = 0;
	p->has_ext = 0;
	p->fragment = 0;
	p->has_home = 0;
	p->has_routed = 0;
	parse_frame(skb, sc, oob_tags);
	if (oob_tags) {
		p->frame_len += 4;
		p->l3_offset += 4;
	}

	types = s->enabled ? s->hash_types : 0;
	if (p->ip_version == 4)
		select_ipv4(s, p, types, &sel);
	else if (p->ip_version == 6)
		select_ipv6(s, p, types, &sel);

	if (!s->enabled)
		queue = 0;
	else if (sel.report == VIRTIO_NET_HASH_REPORT_NONE || !s->redirect)
		queue = s->unclassified_queue;
	else
		queue = s->indirection[sel.hash & (s->table_length - 1) & (MAX_TABLE_LENGTH - 1)];

	write_report(p, &sel, queue, &res, cnt);
	return queue;
}
