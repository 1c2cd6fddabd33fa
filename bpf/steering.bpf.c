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
 * XOR of one table entry per byte.
 *
 * The map value and report structures are mirrored once in vnetbackend/steering/layout.py,
 * which also hands over the Python side's limits and numbers; both are checked at compile
 * time below. Change both sides.
 */

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/virtio_net.h>

#define MAX_KEY_SIZE 40
#define MAX_TABLE_LENGTH 128
#define MAX_HASH_INPUT 36
#define MAX_VLAN_TAGS 2
#define MAX_EXT_HEADERS 8
#define MAX_DSTOPT_OPTIONS 8
#define SLOT_COUNT 2

#ifndef REPORT_RING_PAGES
#define REPORT_RING_PAGES 64
#endif

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
	u8 key[MAX_KEY_SIZE];   /* the key the tables were built from (read back only) */
	u16 indirection[MAX_TABLE_LENGTH];
	u32 toeplitz[MAX_HASH_INPUT][256];
};

struct steering_control {
	u32 active_slot;
	u32 report_every;       /* 0: no reports; N: one report every N frames (per CPU) */
};

struct steering_counters {
	u64 frames;             /* frames the program ran on */
	u64 reports;            /* reports written to the ring buffer */
	u64 reports_dropped;    /* reports lost because the ring buffer was full */
	u64 until_report;       /* frames to skip before the next sampled report */
};

#define REPORT_FLAG_EXT_HEADERS 1
#define REPORT_FLAG_FRAGMENT 2

/* One record in the report ring buffer. Ports are host order; addresses network order. */
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
SAME_VALUE(MAX_EXT_HEADERS);
SAME_VALUE(MAX_DSTOPT_OPTIONS);
SAME_VALUE(SLOT_COUNT);
SAME_VALUE(REPORT_FLAG_EXT_HEADERS);
SAME_VALUE(REPORT_FLAG_FRAGMENT);
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

BPF_ARRAY(rss_slots, struct rss_slot, SLOT_COUNT);
BPF_ARRAY(control, struct steering_control, 1);
BPF_PERCPU_ARRAY(counters, struct steering_counters, 1);
BPF_RINGBUF_OUTPUT(reports, REPORT_RING_PAGES);

/* What a frame offers to the hash (ParsedFrame in the reference model). */
struct parsed {
	u32 frame_len;
	u16 l3_offset;
	u8 ip_version;
	u8 l4_proto;
	u8 has_ext;
	u8 fragment;
	u8 has_home;
	u8 has_routed;
	u8 ports[4];
	u8 src[16];
	u8 dst[16];
	u8 home[16];            /* ex_src when has_home */
	u8 routed[16];          /* ex_dst when has_routed */
};

/* Only the fields before the addresses are zeroed per frame; addresses are read only
 * once ip_version, has_home or has_routed says they were written. */
#define PARSED_ZEROED __builtin_offsetof(struct parsed, src)

/*
 * Reading the frame. A tun steering program sees the skb from the Ethernet header on;
 * BPF_PROG_TEST_RUN hands a socket filter the skb with the Ethernet header already
 * pulled (data at L3, the MAC header 14 bytes before it). `base` is the frame offset of
 * skb->data (0 or 14); bytes past the Ethernet header are read relative to skb->data,
 * which also reaches paged data, and the Ethernet header relative to the MAC header.
 */
static __always_inline int read_at(struct __sk_buff *skb, u32 base, u32 off, void *to, u32 len)
{
	return bpf_skb_load_bytes(skb, off - base, to, len);
}

static __always_inline int is_ext_header(u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT ||
	       nh == IPPROTO_AH || nh == IPPROTO_DSTOPTS;
}

/*
 * The transport header at `off`, if it is TCP or UDP and whole in the frame. `ports` are
 * its first four bytes when the caller has read them already, else NULL.
 */
static __always_inline void parse_transport(struct __sk_buff *skb, u32 base, struct parsed *p,
					    u8 proto, u32 off, const u8 *ports)
{
	u32 need;

	if (proto == IPPROTO_TCP)
		need = 20;
	else if (proto == IPPROTO_UDP)
		need = 8;
	else
		return;
	if (p->frame_len < off + need)
		return;
	if (ports)
		__builtin_memcpy(p->ports, ports, 4);
	else if (read_at(skb, base, off, p->ports, 4) < 0)
		return;
	p->l4_proto = proto;
}

/*
 * An IPv4 header of `ihl` bytes at frame offset `off`, its first 20 bytes already read
 * into `h`; then the transport (`ports` as for parse_transport).
 */
static __always_inline void parse_ipv4_header(struct __sk_buff *skb, u32 base, struct parsed *p,
					      const u8 *h, u32 off, u32 ihl, const u8 *ports)
{
	p->ip_version = 4;
	p->l3_offset = off;
	__builtin_memcpy(p->src, &h[12], 4);
	__builtin_memcpy(p->dst, &h[16], 4);
	if (((h[6] << 8) | h[7]) & 0x3FFF) {
		p->fragment = 1;
		return;
	}
	parse_transport(skb, base, p, h[9], off + ihl, ports);
}

static __always_inline void parse_ipv4(struct __sk_buff *skb, u32 base, struct parsed *p, u32 off)
{
	u8 h[20];
	u32 ihl;

	if (read_at(skb, base, off, h, sizeof(h)) < 0 || (h[0] >> 4) != 4)
		return;
	ihl = (h[0] & 0x0F) * 4;
	if (ihl < 20 || p->frame_len < off + ihl)
		return;
	parse_ipv4_header(skb, base, p, h, off, ihl, NULL);
}

/* The home address option among the first options of a destination options header. */
static __always_inline int find_home_address(struct __sk_buff *skb, u32 base, u32 pos, u32 end,
					     u8 *home)
{
	u8 opt[2];

	for (int i = 0; i < MAX_DSTOPT_OPTIONS; i++) {
		if (pos >= end)
			return 0;
		if (pos + 2 > end) {
			/* Room for a Pad1 only. */
			if (read_at(skb, base, pos, opt, 1) < 0 || opt[0] != IPV6_TLV_PAD1)
				return 0;
			pos += 1;
			continue;
		}
		if (read_at(skb, base, pos, opt, 2) < 0)
			return 0;
		if (opt[0] == IPV6_TLV_PAD1) {
			pos += 1;
			continue;
		}
		if (opt[0] == IPV6_TLV_HAO && opt[1] == 16 && pos + 18 <= end)
			return read_at(skb, base, pos + 2, home, 16) == 0;
		pos += 2 + opt[1];
	}
	return 0;
}

/* The IPv6 extension header chain at `pos` (`nh` names the first), then the transport. */
static __always_inline void parse_ipv6_chain(struct __sk_buff *skb, u32 base, struct parsed *p,
					     u8 nh, u32 pos)
{
	u8 e[8];
	u32 length;
	int chain_ok = 0;

	for (int i = 0; i < MAX_EXT_HEADERS; i++) {
		if (!is_ext_header(nh)) {
			chain_ok = 1;
			break;
		}
		p->has_ext = 1;
		if (read_at(skb, base, pos, e, sizeof(e)) < 0)
			return;
		if (nh == IPPROTO_FRAGMENT) {
			length = 8;
			if (((e[2] << 8) | e[3]) & 0xFFF9)
				p->fragment = 1;
		} else if (nh == IPPROTO_AH) {
			length = (e[1] + 2) * 4;
		} else {
			length = (e[1] + 1) * 8;
		}
		if (p->frame_len < pos + length)
			return;
		if (nh == IPPROTO_ROUTING) {
			if (!p->has_routed && e[2] == 2 && e[1] == 2)
				p->has_routed = read_at(skb, base, pos + 8, p->routed, 16) == 0;
		} else if (nh == IPPROTO_DSTOPTS && !p->has_home) {
			p->has_home = find_home_address(skb, base, pos + 2, pos + length, p->home);
		}
		nh = e[0];
		pos += length;
	}
	if (!chain_ok && is_ext_header(nh))
		return;
	if (!p->fragment)
		parse_transport(skb, base, p, nh, pos, NULL);
}

/*
 * An IPv6 header at frame offset `off`, already read into `h`; then its extension chain
 * and the transport (`ports` as for parse_transport, used when no extension header
 * follows).
 */
static __always_inline void parse_ipv6_header(struct __sk_buff *skb, u32 base, struct parsed *p,
					      const u8 *h, u32 off, const u8 *ports)
{
	p->ip_version = 6;
	p->l3_offset = off;
	__builtin_memcpy(p->src, &h[8], 16);
	__builtin_memcpy(p->dst, &h[24], 16);
	if (is_ext_header(h[6]))
		parse_ipv6_chain(skb, base, p, h[6], off + 40);
	else
		parse_transport(skb, base, p, h[6], off + 40, ports);
}

static __always_inline void parse_ipv6(struct __sk_buff *skb, u32 base, struct parsed *p, u32 off)
{
	u8 h[40];

	if (read_at(skb, base, off, h, sizeof(h)) < 0 || (h[0] >> 4) != 6)
		return;
	parse_ipv6_header(skb, base, p, h, off, NULL);
}

/* XOR of one table entry per input byte: the Toeplitz hash of data at input position pos. */
#define HASH_BYTES(slot, data, pos, n)                                        \
	({                                                                    \
		u32 h_ = 0;                                                   \
		_Pragma("unroll") for (int i_ = 0; i_ < (n); i_++)            \
			h_ ^= (slot)->toeplitz[(pos) + i_][(data)[i_]];       \
		h_;                                                           \
	})

struct selection {
	u32 hash;
	u8 report;
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
			if (p->has_home)
				src = p->home;
			if (p->has_routed)
				dst = p->routed;
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

static __always_inline void write_report(const struct parsed *p, const struct selection *sel,
					 u32 queue, struct steering_counters *cnt)
{
	struct steering_report *r = reports.ringbuf_reserve(sizeof(struct steering_report));

	if (!r) {
		cnt->reports_dropped++;
		return;
	}
	r->hash = sel->hash;
	r->queue = queue;
	r->report_type = sel->report;
	r->ip_version = p->ip_version;
	r->l4_proto = p->l4_proto;
	r->flags = (p->has_ext ? REPORT_FLAG_EXT_HEADERS : 0) |
		   (p->fragment ? REPORT_FLAG_FRAGMENT : 0);
	r->l3_offset = p->ip_version ? p->l3_offset : 0;
	r->frame_len = p->frame_len;
	r->l3_len = p->ip_version ? p->frame_len - p->l3_offset : 0;
	if (p->l4_proto) {
		r->src_port = (p->ports[0] << 8) | p->ports[1];
		r->dst_port = (p->ports[2] << 8) | p->ports[3];
	} else {
		r->src_port = 0;
		r->dst_port = 0;
	}
	__builtin_memset(r->src, 0, 16);
	__builtin_memset(r->dst, 0, 16);
	if (p->ip_version == 4) {
		__builtin_memcpy(r->src, p->src, 4);
		__builtin_memcpy(r->dst, p->dst, 4);
	} else if (p->ip_version == 6) {
		__builtin_memcpy(r->src, p->src, 16);
		__builtin_memcpy(r->dst, p->dst, 16);
	}
	reports.ringbuf_submit(r, 0);
	cnt->reports++;
}

/*
 * Up to two VLAN tags, then IPv4 or IPv6: the general parser, any frame. `oob_tags` (0 or
 * 1) is a tag the skb carries out of band; it counts against the two.
 */
static __always_inline void parse_frame(struct __sk_buff *skb, u32 base, u32 oob_tags,
					struct parsed *p)
{
	u32 off = ETH_HLEN;
	u16 ethertype;
	u8 l2[2];

	if (bpf_skb_load_bytes_relative(skb, 12, l2, 2, BPF_HDR_START_MAC) < 0)
		return;
	ethertype = (l2[0] << 8) | l2[1];
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		u8 tag[4];

		if (ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD)
			break;
		if (i + oob_tags >= MAX_VLAN_TAGS)
			return;
		if (read_at(skb, base, off, tag, 4) < 0)
			return;
		ethertype = (tag[2] << 8) | tag[3];
		off += 4;
	}
	if (ethertype == ETH_P_IP)
		parse_ipv4(skb, base, p, off);
	else if (ethertype == ETH_P_IPV6)
		parse_ipv6(skb, base, p, off);
}

/*
 * The common frames in one read: untagged IPv4 without options and untagged IPv6, with
 * whatever transport. The bytes from the ethertype to the end of the ports (or of the
 * frame, if shorter) are read relative to the MAC header in one call; an IPv6 extension
 * chain is walked from there. Returns 0 (having changed nothing) for every other frame,
 * for short ones, or when those bytes are not linear in the skb; parse_frame then reads
 * the frame piece by piece, to the same result.
 */
#define WINDOW_V4 (2 + 20 + 4)
#define WINDOW_V6 (2 + 40 + 4)

static __always_inline int parse_common(struct __sk_buff *skb, u32 base, struct parsed *p)
{
	u8 w[WINDOW_V6];
	u16 ethertype;
	int full;

	if (p->frame_len >= 12 + WINDOW_V6) {
		if (bpf_skb_load_bytes_relative(skb, 12, w, WINDOW_V6, BPF_HDR_START_MAC) < 0)
			return 0;
		full = 1;
	} else if (p->frame_len >= 12 + WINDOW_V4) {
		if (bpf_skb_load_bytes_relative(skb, 12, w, WINDOW_V4, BPF_HDR_START_MAC) < 0)
			return 0;
		full = 0;
	} else {
		return 0;
	}
	ethertype = (w[0] << 8) | w[1];
	if (ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 && ethertype != ETH_P_8021Q &&
	    ethertype != ETH_P_8021AD)
		return 1; /* not IP: nothing to hash */
	if (ethertype == ETH_P_IP && w[2] == 0x45) {
		parse_ipv4_header(skb, base, p, &w[2], ETH_HLEN, 20, &w[2 + 20]);
		return 1;
	}
	if (full && ethertype == ETH_P_IPV6 && (w[2] >> 4) == 6) {
		parse_ipv6_header(skb, base, p, &w[2], ETH_HLEN, &w[2 + 40]);
		return 1;
	}
	return 0;
}

int steer(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct steering_control *ctl = control.lookup(&zero);
	struct steering_counters *cnt = counters.lookup(&zero);
	struct rss_slot *s;
	struct parsed p;
	struct selection sel = {};
	u32 slot, base, oob_tags, types, queue;
	u8 probe;

	if (!ctl || !cnt)
		return 0;
	cnt->frames++;
	slot = ctl->active_slot % SLOT_COUNT;
	s = rss_slots.lookup(&slot);
	if (!s)
		return 0;

	__builtin_memset(&p, 0, PARSED_ZEROED);
	/* Is there a byte skb->len bytes past the MAC header? Only if data is past it
	 * (a test run); on a tap, data starts at the MAC header. */
	base = bpf_skb_load_bytes_relative(skb, skb->len, &probe, 1, BPF_HDR_START_MAC) == 0
		       ? ETH_HLEN : 0;
	p.frame_len = skb->len + base;
	/*
	 * A VLAN tag the stack keeps out of band (tx-vlan-offload of the tap) is not in the
	 * data; tun writes it into the frame after the MAC addresses. Parse the data, then
	 * give lengths and offsets as in the frame the guest gets.
	 */
	oob_tags = skb->vlan_present ? 1 : 0;
	if (!parse_common(skb, base, &p))
		parse_frame(skb, base, oob_tags, &p);
	if (oob_tags) {
		p.frame_len += 4;
		if (p.ip_version)
			p.l3_offset += 4;
	}

	types = s->enabled ? s->hash_types : 0;
	if (p.ip_version == 4)
		select_ipv4(s, &p, types, &sel);
	else if (p.ip_version == 6)
		select_ipv6(s, &p, types, &sel);

	if (!s->enabled)
		queue = 0;
	else if (sel.report == VIRTIO_NET_HASH_REPORT_NONE || !s->redirect)
		queue = s->unclassified_queue;
	else
		queue = s->indirection[sel.hash & (s->table_length - 1) & (MAX_TABLE_LENGTH - 1)];

	if (ctl->report_every) {
		/* A countdown left from a sparser sampling does not delay a denser one. */
		if (cnt->until_report == 0 || cnt->until_report >= ctl->report_every) {
			cnt->until_report = ctl->report_every - 1;
			write_report(&p, &sel, queue, cnt);
		} else {
			cnt->until_report--;
		}
	}
	return queue;
}
