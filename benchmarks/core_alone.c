/*
 * benchmarks/core_alone.c -- the Totem C core alone, no Python.
 *
 * N rings (node ids 1..N) run in this one process on one CPU, connected by a
 * deterministic in-memory network: a FIFO of (deliver_at, dest, packet copy)
 * with a fixed one-way latency.  Because the latency is fixed and the virtual
 * clock never goes back, arrival order equals queue order, so a growable ring
 * buffer is an exact priority queue.  The virtual clock jumps to the next
 * event: the next packet arrival or the earliest gc_ring_next_deadline().
 *
 *   Phase 1  start every ring at t=0; run until each one has delivered a
 *            regular CONFCHG with N members (fails after 10 virtual seconds).
 *   Phase 2  busy: every ring's send queue is kept topped up (backlog 300);
 *            run for --seconds of virtual time; CPU time is measured with
 *            CLOCK_PROCESS_CPUTIME_ID around this phase only.
 *   Drain    stop submitting, run 0.2 virtual seconds (extended, up to 5 s,
 *            while messages are still pending), then check that every ring
 *            delivered the same number of messages with the same FNV-1a hash
 *            over (sender, payload), that no message was lost or duplicated
 *            and that each sender's messages arrived in FIFO order.  Each
 *            payload is an 8-byte per-sender counter followed by filler; by
 *            default the hash covers (sender, length) and the counter as two
 *            64-bit FNV-1a words and the filler is checked with memcmp,
 *            because hashing every byte costs more CPU than the core itself
 *            (--full-hash hashes every byte, FNV-1a bytewise).
 *   Phase 3  idle for --idle-seconds: tokens/s, packets/s, CPU per virtual s.
 *
 * The CPU figures include this harness (queueing, memcpy, hashing), so they
 * are an upper bound of the core's own cost.
 *
 * Build (from the repo root):
 *   gcc -O2 -std=gnu11 -Wall -Wextra -Igroupcomm groupcomm/_ring.c \
 *       benchmarks/core_alone.c -o /tmp/core_alone
 * Usage:
 *   core_alone [--members N] [--payload BYTES] [--mtu BYTES] [--seconds VSEC]
 *              [--idle-seconds VSEC] [--latency-us US] [--backlog N]
 *              [--window N] [--max-messages N] [--safe] [--full-hash] [--json]
 */
#include "_ring.h"

#include <endian.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull
#define US_PER_S 1000000ull

/* ------------------------------------------------------------------ */
/* Options                                                             */
/* ------------------------------------------------------------------ */

typedef struct {
    unsigned members;
    unsigned payload;
    unsigned mtu;
    double seconds;
    double idle_seconds;
    uint64_t latency_us;
    unsigned backlog;
    unsigned window;        /* 0: core default */
    unsigned max_messages;  /* 0: core default */
    int safe;
    int full_hash;          /* hash every payload byte (slow: measures FNV, not the core) */
    int json;
} opts_t;

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [--members N] [--payload BYTES] [--mtu BYTES] [--seconds VSEC]\n"
            "          [--idle-seconds VSEC] [--latency-us US] [--backlog N]\n"
            "          [--window N] [--max-messages N] [--safe] [--full-hash] [--json]\n",
            argv0);
}

static int parse_uint(const char *s, unsigned long long lo, unsigned long long hi, unsigned long long *out)
{
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (!s[0] || !end || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_opts(int argc, char **argv, opts_t *o)
{
    o->members = 3;
    o->payload = 100;
    o->mtu = 1400;
    o->seconds = 1.0;
    o->idle_seconds = 10.0;
    o->latency_us = 100;
    o->backlog = 300;
    o->window = 0;
    o->max_messages = 0;
    o->safe = 0;
    o->full_hash = 0;
    o->json = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        unsigned long long v;
        if (!strcmp(a, "--json")) { o->json = 1; continue; }
        if (!strcmp(a, "--safe")) { o->safe = 1; continue; }
        if (!strcmp(a, "--full-hash")) { o->full_hash = 1; continue; }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(argv[0]); exit(0); }
        if (i + 1 >= argc) { fprintf(stderr, "%s: missing value\n", a); return -1; }
        const char *val = argv[++i];
        if (!strcmp(a, "--members")) {
            if (parse_uint(val, 1, GC_MAX_MEMBERS, &v)) goto bad;
            o->members = (unsigned)v;
        } else if (!strcmp(a, "--payload")) {
            if (parse_uint(val, 0, 65535, &v)) goto bad;
            o->payload = (unsigned)v;
        } else if (!strcmp(a, "--mtu")) {
            if (parse_uint(val, 1, 65535, &v)) goto bad;
            o->mtu = (unsigned)v;
        } else if (!strcmp(a, "--latency-us")) {
            if (parse_uint(val, 1, 10 * US_PER_S, &v)) goto bad;
            o->latency_us = v;
        } else if (!strcmp(a, "--backlog")) {
            if (parse_uint(val, 1, 1000000, &v)) goto bad;
            o->backlog = (unsigned)v;
        } else if (!strcmp(a, "--window")) {
            if (parse_uint(val, 1, 1000000, &v)) goto bad;
            o->window = (unsigned)v;
        } else if (!strcmp(a, "--max-messages")) {
            if (parse_uint(val, 1, 1000000, &v)) goto bad;
            o->max_messages = (unsigned)v;
        } else if (!strcmp(a, "--seconds") || !strcmp(a, "--idle-seconds")) {
            char *end = NULL;
            double d = strtod(val, &end);
            if (!val[0] || *end || !(d >= 0.0) || d > 1e6) goto bad;
            if (!strcmp(a, "--seconds")) o->seconds = d; else o->idle_seconds = d;
        } else {
            fprintf(stderr, "unknown option %s\n", a);
            return -1;
        }
        continue;
    bad:
        fprintf(stderr, "bad value for %s: %s\n", a, val);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Network: FIFO of packets with a fixed latency                        */
/* ------------------------------------------------------------------ */

typedef struct pkt {
    uint32_t refs;
    uint32_t len;
    uint32_t cap;
    struct pkt *next_free;
    uint8_t data[];
} pkt_t;

typedef struct {
    uint64_t at;
    uint32_t dest;   /* ring index 0..N-1 */
    pkt_t *pkt;
} ev_t;

typedef struct {
    ev_t *ev;
    size_t cap;      /* power of two */
    size_t head;
    size_t count;
    size_t max_count;
} fifo_t;

static void die(const char *what)
{
    fprintf(stderr, "core_alone: %s\n", what);
    exit(2);
}

static void fifo_push(fifo_t *q, uint64_t at, uint32_t dest, pkt_t *p)
{
    if (q->count == q->cap) {
        size_t ncap = q->cap ? q->cap * 2 : 1024;
        ev_t *n = malloc(ncap * sizeof(*n));
        if (!n) die("out of memory");
        for (size_t i = 0; i < q->count; i++) n[i] = q->ev[(q->head + i) & (q->cap - 1)];
        free(q->ev);
        q->ev = n;
        q->cap = ncap;
        q->head = 0;
    }
    ev_t *e = &q->ev[(q->head + q->count) & (q->cap - 1)];
    e->at = at;
    e->dest = dest;
    e->pkt = p;
    q->count++;
    if (q->count > q->max_count) q->max_count = q->count;
}

/* Packet buffers are recycled through a free list: with 64 KB datagrams,
   malloc/free would otherwise grow and trim the heap on every packet and the
   page faults would be charged to the benchmark. */
static pkt_t *pkt_free_list;
static uint32_t pkt_pool_cap;   /* capacity of pooled buffers (mtu + slack) */

static pkt_t *pkt_new(const uint8_t *data, size_t len, uint32_t refs)
{
    pkt_t *p;
    if (len <= pkt_pool_cap && pkt_free_list) {
        p = pkt_free_list;
        pkt_free_list = p->next_free;
    } else {
        uint32_t cap = len <= pkt_pool_cap ? pkt_pool_cap : (uint32_t)len;
        p = malloc(sizeof(*p) + cap);
        if (!p) die("out of memory");
        p->cap = cap;
    }
    p->refs = refs;
    p->len = (uint32_t)len;
    memcpy(p->data, data, len);
    return p;
}

static void pkt_release(pkt_t *p)
{
    if (--p->refs) return;
    if (p->cap == pkt_pool_cap) {
        p->next_free = pkt_free_list;
        pkt_free_list = p;
    } else {
        free(p);
    }
}

static void pkt_pool_free(void)
{
    while (pkt_free_list) {
        pkt_t *p = pkt_free_list;
        pkt_free_list = p->next_free;
        free(p);
    }
}

/* ------------------------------------------------------------------ */
/* Simulation                                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    gc_ring_t *ring;
    uint64_t hash;             /* FNV-1a over (sender, len, payload) of deliveries */
    uint64_t delivered;        /* DELIVER actions */
    uint64_t confchgs;         /* CONFCHG actions */
    int formed;                /* saw a regular CONFCHG with N members */
    uint64_t submitted;        /* messages accepted by gc_ring_submit */
    uint64_t *next_from;       /* per sender: next expected message counter */
    uint64_t fifo_errors;      /* out-of-order, lost or duplicated per sender */
    uint64_t rx_local_errors;  /* receive returned a local-misuse error */
    uint64_t rx_rejected;      /* receive returned a remote-misbehaviour code */
    uint64_t last_tick;        /* virtual time of the last gc_ring_tick */
} node_t;

typedef struct {
    opts_t o;
    unsigned n;
    node_t *node;
    fifo_t net;
    uint64_t now;
    int busy;                  /* keep send queues topped up */
    uint8_t *payload;
    uint64_t misaddressed;
    uint64_t rearms;           /* ticks that left a deadline <= now (deferred 1 us) */
} sim_t;

static inline uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

/* FNV-1a step over a whole 64-bit word (one multiply per word). */
static inline uint64_t fnv1a_u64(uint64_t h, uint64_t w)
{
    return (h ^ w) * FNV_PRIME;
}

static void put_le32(uint8_t *b, uint32_t v)
{
    b[0] = (uint8_t)v; b[1] = (uint8_t)(v >> 8); b[2] = (uint8_t)(v >> 16); b[3] = (uint8_t)(v >> 24);
}

static inline uint64_t get_le64(const uint8_t *b)
{
    uint64_t v;
    memcpy(&v, b, sizeof(v));
    return le64toh(v);
}

static void check_rc(sim_t *s, unsigned i, const char *call, int rc)
{
    if (rc >= 0) return;
    if (rc <= GC_ETRUNCATED) { s->node[i].rx_rejected++; return; }
    fprintf(stderr, "core_alone: node %u: %s failed at t=%" PRIu64 " us: %s (%d)\n",
            i + 1, call, s->now, gc_strerror(rc), rc);
    exit(2);
}

/* Performs the actions of ring i.  Packets are copied into the network queue,
   so nothing refers to the ring's buffers after this returns. */
static void drain_actions(sim_t *s, unsigned i)
{
    node_t *nd = &s->node[i];
    const gc_action_t *acts;
    const uint8_t *data;
    size_t n_acts, data_len;
    if (gc_ring_take(nd->ring, &acts, &n_acts, &data, &data_len) != GC_OK) die("gc_ring_take failed");
    uint64_t at = s->now + s->o.latency_us;
    for (size_t k = 0; k < n_acts; k++) {
        const gc_action_t *a = &acts[k];
        const uint8_t *d = data + a->offset;
        switch (a->kind) {
        case GC_ACT_SEND_MCAST: {
            if (s->n < 2) break;
            pkt_t *p = pkt_new(d, a->len, s->n - 1);
            for (unsigned j = 0; j < s->n; j++)
                if (j != i) fifo_push(&s->net, at, j, p);
            break;
        }
        case GC_ACT_SEND_UNICAST: {
            if (a->node < 1 || a->node > s->n) { s->misaddressed++; break; }
            fifo_push(&s->net, at, a->node - 1, pkt_new(d, a->len, 1));
            break;
        }
        case GC_ACT_DELIVER: {
            if (s->o.full_hash || a->len != s->o.payload || a->len < 8) {
                uint8_t hdr[8];
                put_le32(hdr, a->node);
                put_le32(hdr + 4, a->len);
                nd->hash = fnv1a(fnv1a(nd->hash, hdr, sizeof(hdr)), d, a->len);
            } else {
                /* Every payload is (counter, filler): hash (sender, length) and
                   the counter as two 64-bit words and check the filler with
                   memcmp.  Hashing every byte costs more CPU than the core
                   itself and detects no more (see --full-hash). */
                nd->hash = fnv1a_u64(fnv1a_u64(nd->hash, ((uint64_t)a->node << 32) | a->len), get_le64(d));
                if (memcmp(d + 8, s->payload + 8, a->len - 8) != 0) nd->fifo_errors++;
            }
            nd->delivered++;
            if (s->o.payload >= 8) {
                if (a->node < 1 || a->node > s->n || a->len != s->o.payload) {
                    nd->fifo_errors++;
                } else {
                    uint64_t c = get_le64(d);
                    if (c != nd->next_from[a->node - 1]) nd->fifo_errors++;
                    nd->next_from[a->node - 1] = c + 1;
                }
            }
            break;
        }
        case GC_ACT_CONFCHG:
            nd->confchgs++;
            if (!(a->flags & 1) && a->count == s->n) nd->formed = 1;
            break;
        default:
            fprintf(stderr, "core_alone: node %u: unknown action kind %u\n", i + 1, a->kind);
            exit(2);
        }
    }
}

static void top_up(sim_t *s, unsigned i)
{
    node_t *nd = &s->node[i];
    while (gc_ring_pending(nd->ring) < s->o.backlog) {
        if (s->o.payload >= 8) {
            uint64_t c = htole64(nd->submitted);
            memcpy(s->payload, &c, sizeof(c));
        }
        int rc = gc_ring_submit(nd->ring, s->now, s->payload, s->o.payload, s->o.safe);
        if (rc == GC_EQUEUEFULL) break;
        if (rc == GC_ENOTRUNNING) break;
        check_rc(s, i, "gc_ring_submit", rc);
        nd->submitted++;
        drain_actions(s, i);
    }
}

/* The ring's next deadline, with a timer granularity of 1 us: a ring is
   ticked at most once per virtual instant.  Without this, a singleton ring
   (whose token goes to itself through an immediate timer) would spin forever
   at one instant, since the virtual clock only moves on events. */
static uint64_t deadline(const sim_t *s, unsigned i)
{
    const node_t *nd = &s->node[i];
    uint64_t d = gc_ring_next_deadline(nd->ring);
    if (d != UINT64_MAX && nd->last_tick != UINT64_MAX && d <= nd->last_tick) d = nd->last_tick + 1;
    return d;
}

/* Runs until virtual time t_end, or until stop(s) holds (checked after each
   step).  Returns 1 if stopped by the predicate. */
static int run(sim_t *s, uint64_t t_end, int (*stop)(const sim_t *))
{
    for (;;) {
        if (stop && stop(s)) return 1;
        uint64_t t = UINT64_MAX;
        if (s->net.count) t = s->net.ev[s->net.head].at;
        for (unsigned i = 0; i < s->n; i++) {
            uint64_t d = deadline(s, i);
            if (d < t) t = d;
        }
        if (t > t_end) { s->now = t_end; return 0; }
        if (t > s->now) s->now = t;
        /* arrivals due now, in FIFO order */
        while (s->net.count && s->net.ev[s->net.head].at <= s->now) {
            ev_t e = s->net.ev[s->net.head];
            s->net.head = (s->net.head + 1) & (s->net.cap - 1);
            s->net.count--;
            node_t *nd = &s->node[e.dest];
            check_rc(s, e.dest, "gc_ring_receive", gc_ring_receive(nd->ring, s->now, e.pkt->data, e.pkt->len));
            pkt_release(e.pkt);
            drain_actions(s, e.dest);
            if (s->busy) top_up(s, e.dest);
        }
        /* timers due now */
        for (unsigned i = 0; i < s->n; i++) {
            node_t *nd = &s->node[i];
            if (deadline(s, i) > s->now) continue;
            check_rc(s, i, "gc_ring_tick", gc_ring_tick(nd->ring, s->now));
            nd->last_tick = s->now;
            drain_actions(s, i);
            if (s->busy) top_up(s, i);
            if (gc_ring_next_deadline(nd->ring) <= s->now) s->rearms++;
        }
    }
}

static int all_formed(const sim_t *s)
{
    for (unsigned i = 0; i < s->n; i++)
        if (!s->node[i].formed) return 0;
    return 1;
}

static int all_drained(const sim_t *s)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < s->n; i++) total += s->node[i].submitted;
    for (unsigned i = 0; i < s->n; i++)
        if (gc_ring_pending(s->node[i].ring) || s->node[i].delivered != total) return 0;
    return 1;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    uint64_t tokens_r1, packets, bytes, retrans, delivered_r1, delivered_all;
} snap_t;

static snap_t snapshot(const sim_t *s)
{
    snap_t x;
    memset(&x, 0, sizeof(x));
    gc_ring_stats_t st;
    gc_ring_get_stats(s->node[0].ring, &st);
    x.tokens_r1 = st.tokens_received;
    x.delivered_r1 = s->node[0].delivered;
    for (unsigned i = 0; i < s->n; i++) {
        gc_ring_get_stats(s->node[i].ring, &st);
        x.packets += st.packets_sent;
        x.bytes += st.bytes_sent;
        x.retrans += st.retransmissions;
        x.delivered_all += s->node[i].delivered;
    }
    return x;
}

static uint64_t total_confchgs(const sim_t *s)
{
    uint64_t c = 0;
    for (unsigned i = 0; i < s->n; i++) c += s->node[i].confchgs;
    return c;
}

static double div0(double a, double b) { return b > 0 ? a / b : 0.0; }

int main(int argc, char **argv)
{
    sim_t S;
    sim_t *s = &S;
    memset(s, 0, sizeof(*s));
    if (parse_opts(argc, argv, &s->o) < 0) { usage(argv[0]); return 2; }
    s->n = s->o.members;
    pkt_pool_cap = s->o.mtu + 1024;
    s->node = calloc(s->n, sizeof(node_t));
    s->payload = malloc(s->o.payload ? s->o.payload : 1);
    if (!s->node || !s->payload) die("out of memory");
    memset(s->payload, 'x', s->o.payload);

    gc_ring_config_t cfg;
    gc_ring_config_default(&cfg);
    cfg.mtu = s->o.mtu;
    if (s->o.window) cfg.window_size = s->o.window;
    if (s->o.max_messages) cfg.max_messages = s->o.max_messages;
    if (cfg.max_messages > cfg.window_size) cfg.max_messages = cfg.window_size;
    while (cfg.sort_queue_size < 4 * cfg.window_size) cfg.sort_queue_size *= 2;
    for (unsigned i = 0; i < s->n; i++) {
        cfg.node_id = i + 1;
        const char *err = NULL;
        if (gc_ring_config_check(&cfg, &err) != GC_OK) {
            fprintf(stderr, "core_alone: bad configuration: %s\n", err ? err : "?");
            return 2;
        }
        int rc = gc_ring_new(&cfg, &s->node[i].ring);
        if (rc != GC_OK) { fprintf(stderr, "core_alone: gc_ring_new: %s\n", gc_strerror(rc)); return 2; }
        s->node[i].hash = FNV_OFFSET;
        s->node[i].last_tick = UINT64_MAX;
        s->node[i].next_from = calloc(s->n, sizeof(uint64_t));
        if (!s->node[i].next_from) die("out of memory");
    }
    size_t max_payload = gc_ring_max_payload(s->node[0].ring);
    if (s->o.payload > max_payload) {
        fprintf(stderr, "core_alone: payload %u > max payload %zu for mtu %u\n", s->o.payload, max_payload, s->o.mtu);
        return 2;
    }

    /* ---- phase 1: formation ---- */
    for (unsigned i = 0; i < s->n; i++) {
        check_rc(s, i, "gc_ring_start", gc_ring_start(s->node[i].ring, 0));
        drain_actions(s, i);
    }
    double cpu_f0 = cpu_now();
    if (!run(s, 10 * US_PER_S, all_formed)) {
        fprintf(stderr, "core_alone: FAIL: no regular configuration of %u members after 10 virtual seconds\n", s->n);
        for (unsigned i = 0; i < s->n; i++) {
            char buf[512];
            gc_ring_debug(s->node[i].ring, buf, sizeof(buf));
            fprintf(stderr, "  formed=%d confchgs=%" PRIu64 " %s\n", s->node[i].formed, s->node[i].confchgs, buf);
        }
        return 1;
    }
    double cpu_form = cpu_now() - cpu_f0;
    uint64_t t_formed = s->now;
    uint64_t confchg_formation = total_confchgs(s);
    printf("phase 1 formation: %u members, mtu %u, payload %u B, latency %" PRIu64 " us: "
           "regular configuration of %u at every ring after %.3f virtual ms (%" PRIu64 " confchgs, %.1f ms CPU)\n",
           s->n, s->o.mtu, s->o.payload, s->o.latency_us, s->n, (double)t_formed / 1e3,
           confchg_formation, cpu_form * 1e3);

    /* ---- phase 2: busy ---- */
    uint64_t busy_us = (uint64_t)(s->o.seconds * 1e6 + 0.5);
    uint64_t confchg_before = total_confchgs(s);
    snap_t b0 = snapshot(s);
    uint64_t sub0 = 0;
    for (unsigned i = 0; i < s->n; i++) sub0 += s->node[i].submitted;
    uint64_t v0 = s->now;
    double cpu0 = cpu_now();
    s->busy = 1;
    for (unsigned i = 0; i < s->n; i++) top_up(s, i);
    run(s, v0 + busy_us, NULL);
    s->busy = 0;
    double cpu_busy = cpu_now() - cpu0;
    snap_t b1 = snapshot(s);
    uint64_t sub1 = 0;
    for (unsigned i = 0; i < s->n; i++) sub1 += s->node[i].submitted;
    double vbusy = (double)(s->now - v0) / 1e6;
    uint64_t ordered = b1.delivered_r1 - b0.delivered_r1;
    uint64_t deliveries = b1.delivered_all - b0.delivered_all;
    uint64_t tokens = b1.tokens_r1 - b0.tokens_r1;
    uint64_t busy_packets = b1.packets - b0.packets;
    uint64_t confchg_busy = total_confchgs(s) - confchg_before;
    double ordered_cpu = div0((double)ordered, cpu_busy);
    double deliveries_cpu = div0((double)deliveries, cpu_busy);
    double msgs_per_rot = div0((double)ordered, (double)tokens);
    printf("phase 2 busy: %.3f virtual s, %.3f s CPU: ordered msgs at ring 1 %" PRIu64 " (%.0f /CPU-s, %.0f /virtual-s), "
           "deliveries all rings %" PRIu64 " (%.0f /CPU-s), tokens at ring 1 %" PRIu64 " (%.0f /virtual-s), "
           "%.1f msgs/rotation, %.2f us CPU/token visit, %" PRIu64 " packets sent, %" PRIu64 " retransmissions, %" PRIu64 " confchgs\n",
           vbusy, cpu_busy, ordered, ordered_cpu, div0((double)ordered, vbusy), deliveries, deliveries_cpu,
           tokens, div0((double)tokens, vbusy), msgs_per_rot, div0(cpu_busy * 1e6, (double)tokens * s->n),
           busy_packets, b1.retrans - b0.retrans, confchg_busy);

    /* ---- drain and verify ---- */
    uint64_t d0 = s->now;
    run(s, d0 + 200000, NULL);
    if (!all_drained(s)) run(s, d0 + 5 * US_PER_S, all_drained);
    double drain_ms = (double)(s->now - d0) / 1e3;
    uint64_t total_sub = 0;
    for (unsigned i = 0; i < s->n; i++) total_sub += s->node[i].submitted;
    int ok = 1;
    for (unsigned i = 0; i < s->n; i++) {
        node_t *nd = &s->node[i];
        size_t pend = gc_ring_pending(nd->ring);
        if (nd->delivered != s->node[0].delivered || nd->hash != s->node[0].hash || nd->delivered != total_sub ||
            nd->fifo_errors || pend) {
            ok = 0;
            fprintf(stderr, "core_alone: node %u: delivered %" PRIu64 " (ring 1: %" PRIu64 ", submitted: %" PRIu64 "), "
                    "hash %016" PRIx64 " (ring 1: %016" PRIx64 "), per-sender FIFO or content errors %" PRIu64 ", pending %zu\n",
                    i + 1, nd->delivered, s->node[0].delivered, total_sub, nd->hash, s->node[0].hash,
                    nd->fifo_errors, pend);
        }
    }
    if (confchg_busy) {
        ok = 0;
        fprintf(stderr, "core_alone: %" PRIu64 " configuration changes during the busy phase on a lossless network\n",
                confchg_busy);
    }
    if (!ok) {
        printf("order NOT verified: %u members, payload %u, mtu %u (see stderr)\n", s->n, s->o.payload, s->o.mtu);
        return 1;
    }
    printf("order verified: every ring delivered all %" PRIu64 " messages (%" PRIu64 " in the busy phase) "
           "in the same order, hash %016" PRIx64 ", drained in %.1f virtual ms\n",
           total_sub, sub1 - sub0, s->node[0].hash, drain_ms);

    /* ---- phase 3: idle ---- */
    uint64_t idle_us = (uint64_t)(s->o.idle_seconds * 1e6 + 0.5);
    uint64_t confchg_idle0 = total_confchgs(s);
    snap_t i0 = snapshot(s);
    uint64_t vi0 = s->now;
    double cpu_i0 = cpu_now();
    run(s, vi0 + idle_us, NULL);
    double cpu_idle = cpu_now() - cpu_i0;
    snap_t i1 = snapshot(s);
    double vidle = (double)(s->now - vi0) / 1e6;
    uint64_t confchg_idle = total_confchgs(s) - confchg_idle0;
    double idle_tokens_s = div0((double)(i1.tokens_r1 - i0.tokens_r1), vidle);
    double idle_packets_s = div0((double)(i1.packets - i0.packets), vidle);
    double idle_cpu_us_per_vs = div0(cpu_idle * 1e6, vidle);
    printf("phase 3 idle: %.3f virtual s, %.3f ms CPU: %.1f tokens/s at ring 1, %.1f packets/s cluster, "
           "%.1f us CPU per virtual s, %" PRIu64 " confchgs\n",
           vidle, cpu_idle * 1e3, idle_tokens_s, idle_packets_s, idle_cpu_us_per_vs, confchg_idle);

    if (s->o.json) {
        printf("{\"members\": %u, \"payload\": %u, \"mtu\": %u, \"latency_us\": %" PRIu64 ", \"backlog\": %u, "
               "\"safe\": %s, \"full_hash\": %s, \"window_size\": %u, \"max_messages\": %u, \"max_payload\": %zu, "
               "\"formation_virtual_ms\": %.3f, \"formation_confchgs\": %" PRIu64 ", "
               "\"busy_virtual_s\": %.6f, \"busy_cpu_s\": %.6f, \"ordered_msgs\": %" PRIu64 ", "
               "\"deliveries_all\": %" PRIu64 ", \"tokens\": %" PRIu64 ", \"busy_packets_sent\": %" PRIu64 ", "
               "\"busy_retransmissions\": %" PRIu64 ", \"busy_confchgs\": %" PRIu64 ", "
               "\"ordered_msgs_per_cpu_s\": %.0f, \"deliveries_per_cpu_s\": %.0f, "
               "\"ordered_msgs_per_virtual_s\": %.0f, \"busy_tokens_per_virtual_s\": %.1f, "
               "\"msgs_per_rotation\": %.2f, \"cpu_us_per_token_visit\": %.3f, "
               "\"order_verified\": true, \"total_delivered_per_ring\": %" PRIu64 ", \"drain_virtual_ms\": %.3f, "
               "\"delivery_hash\": \"%016" PRIx64 "\", "
               "\"idle_virtual_s\": %.6f, \"idle_cpu_s\": %.6f, \"idle_tokens_per_s\": %.2f, "
               "\"idle_packets_per_s\": %.2f, \"idle_cpu_us_per_virtual_s\": %.2f, \"idle_confchgs\": %" PRIu64 ", "
               "\"max_in_flight_packets\": %zu, \"misaddressed\": %" PRIu64 ", \"deferred_rearms\": %" PRIu64 "}\n",
               s->n, s->o.payload, s->o.mtu, s->o.latency_us, s->o.backlog, s->o.safe ? "true" : "false", s->o.full_hash ? "true" : "false",
               cfg.window_size, cfg.max_messages, max_payload,
               (double)t_formed / 1e3, confchg_formation,
               vbusy, cpu_busy, ordered, deliveries, tokens, busy_packets, b1.retrans - b0.retrans, confchg_busy,
               ordered_cpu, deliveries_cpu, div0((double)ordered, vbusy), div0((double)tokens, vbusy),
               msgs_per_rot, div0(cpu_busy * 1e6, (double)tokens * s->n),
               total_sub, drain_ms, s->node[0].hash,
               vidle, cpu_idle, idle_tokens_s, idle_packets_s, idle_cpu_us_per_vs, confchg_idle,
               s->net.max_count, s->misaddressed, s->rearms);
    }

    for (unsigned i = 0; i < s->n; i++) {
        gc_ring_free(s->node[i].ring);
        free(s->node[i].next_from);
    }
    while (s->net.count) {
        pkt_release(s->net.ev[s->net.head].pkt);
        s->net.head = (s->net.head + 1) & (s->net.cap - 1);
        s->net.count--;
    }
    free(s->net.ev);
    pkt_pool_free();
    free(s->node);
    free(s->payload);
    return 0;
}
