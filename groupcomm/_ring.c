/*
 * groupcomm/_ring.c -- the Totem single-ring ordering and membership protocol,
 * as a sans-IO state machine.
 *
 * References
 *   - Y. Amir, L. E. Moser, P. M. Melliar-Smith, D. A. Agarwal, P. Ciarfella,
 *     "The Totem single-ring ordering and membership protocol", ACM TOCS 13(4), 1995.
 *   - L. E. Moser, Y. Amir, P. M. Melliar-Smith, D. A. Agarwal,
 *     "Extended virtual synchrony", ICDCS 1994.
 *   - Corosync's exec/totemsrp.c, whose timers, defaults and hard-won fixes we
 *     follow (docs/design.rst lists each mechanism and the trap it avoids).
 *
 * Shape
 *   No sockets, clocks, threads or callbacks.  Inputs: gc_ring_receive (a
 *   packet), gc_ring_submit (an application message), gc_ring_tick (time
 *   passed), gc_ring_start / gc_ring_leave.  Outputs accumulate as actions
 *   (packets to send, deliveries, configuration changes) drained in one batch
 *   by gc_ring_take.  All state lives in struct gc_ring.
 *
 * Deviations from the paper, and from corosync
 *   - Message packing: one ring message (one sequence number) is one datagram
 *     carrying as many application messages as fit in `mtu` (corosync does
 *     this one layer up, in totempg).  A datagram holding a safe message is
 *     delivered under the safe rule, so the order stays total.
 *   - Safe delivery is implemented (corosync does not): a message is safe
 *     once the token's aru covered it on two successive visits.
 *   - Token hold (corosync): an idle representative parks the token for
 *     `hold_us`; any member with work multicasts a hold-cancel.  A token that
 *     carries retransmission requests is never held.
 *   - Failure to receive follows corosync: the stuck member excludes itself
 *     and forms a singleton ring, so it cannot pin the aru of the others.
 *   - Recovery decapsulates old-ring messages as they arrive (not at
 *     installation), so the recovery queue can be freed by the token's aru
 *     like a regular one and a long recovery cannot fill the window.  Of the
 *     old-ring messages, a member re-sends those no lower-positioned
 *     transitional member is known (by its aru) to hold, which cuts the
 *     duplicates corosync sends.
 *   - Installation delivers old-ring messages per EVS using the commit
 *     token's high_delivered (corosync computes it and ignores it): in the old
 *     regular configuration up to the first hole or the first safe message not
 *     known safe; then the transitional configuration; then the rest (after a
 *     hole, only from transitional members); then the regular configuration.
 *   - Membership messages from ourselves are applied locally at once; we never
 *     depend on multicast loopback (corosync PR #206).  A token whose successor
 *     is ourselves (singleton ring) is queued and processed at the next tick.
 *   - Restart: ring ids are (rep, 64-bit seq) and a new incarnation starts
 *     above `ring_seq_floor`, which the driver persists (corosync PR #495).
 *     Ring seqs end at 2^62; a join may carry only a seq its commit token can
 *     use (2^62 - 4), or one corrupt join would wedge membership for good.
 *   - A failed round leaves my_ring_id naming the aborted ring; the regular
 *     queue still belongs to the last installed ring (my_old_ring_id), so each
 *     queue takes messages of its own ring only, and recovery messages of any
 *     other ring are dropped in every state.  A join that ends a round in
 *     COMMIT or RECOVERY starts a fresh one (no votes carried over).
 *   - Pause detection (corosync's pause timestamp and receive-queue flush, in
 *     sans-IO form): a call pause_us or more past our earliest deadline means
 *     this process was stopped; token-loss and consensus timers restart from
 *     now and joins read within the next join period are dropped as stale.
 *   - One-way links and partial deafness end in one stable configuration: a
     member that failed to receive (rotations and two token timeouts stuck),
     or that others keep failing while its own rounds fail, forms its
     singleton at once and is quarantined (doubling back-off, then it merges
     only once every member of a ring answered its probes); holes it keeps
     missing are requested again with a back-off, so it cannot spend the
     ring's budget (corosync #622, #750, #760).
   - A fresh member has no previous configuration, so its first installation
 *     delivers only the regular configuration.
 *   - Every packet is decoded with explicit bounds checks into a parsed value
 *     before any state changes; bad packets are counted and dropped.
 *
 * Limits are configuration fields (gc_ring_config_t) with defaults in
 * gc_ring_config_default(); GC_MAX_MEMBERS and GC_RTR_MAX are compile-time.
 */
#include "_ring.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Wire constants                                                      */
/* ------------------------------------------------------------------ */

#define WIRE_MAGIC 0x4743u   /* "GC" */
#define WIRE_VERSION ((unsigned)GC_WIRE_VERSION)

enum msg_type {
    MSG_TOKEN = 1,
    MSG_MCAST = 2,
    MSG_JOIN = 3,
    MSG_COMMIT = 4,
    MSG_MERGE_DETECT = 5,
    MSG_HOLD_CANCEL = 6,
    MSG_PROBE = 7,              /* a quarantined member asks who hears it (ring notice) */
    MSG_PROBE_REPLY = 8,        /* ring id + members: the answer, multicast */
    MSG_TYPE_COUNT = 9
};

#define HDR_LEN 12u                       /* magic, version, type, cluster, sender */
#define RINGID_LEN 12u                    /* rep u32, seq u64 */
#define MCAST_HDR_LEN (HDR_LEN + RINGID_LEN + 4u + 1u + 2u)
#define ENTRY_HDR_LEN 3u                  /* flags u8, len u16 */
#define MCAST_FLAG_ENCAP 0x01u
#define MCAST_FLAG_SAFE 0x02u
#define ENTRY_FLAG_SAFE 0x01u
#define JOIN_FLAG_LEAVE 0x01u
#define COMMIT_ENTRY_LEN (RINGID_LEN + 4u + 4u + 1u)
#define TOKEN_BASE_LEN (HDR_LEN + RINGID_LEN + 6u * 4u + 2u)
#define COMMIT_LEN(n) (HDR_LEN + RINGID_LEN + 2u + 2u + (n) * (4u + COMMIT_ENTRY_LEN))
#define MAX_PACKET 65507u                 /* largest UDP payload over IPv4 */
/* A new ring's seq is the highest ring seq seen plus RING_SEQ_STEP (corosync:
   4).  Honest rings never come near 2^62 (2^60 membership rounds); a higher
   seq is forged or corrupt.  Every seq a join may carry (and a restart may
   start from) must leave room for the commit token it leads to, or that token
   is refused everywhere and membership wedges for good; joins above
   JOIN_RING_SEQ_MAX are counted (drop_malformed) and dropped. */
#define RING_SEQ_STEP 4u
#define RING_SEQ_MAX (UINT64_C(1) << 62)
#define JOIN_RING_SEQ_MAX (RING_SEQ_MAX - RING_SEQ_STEP)
#define CONTROL_BUF_LEN 4096u             /* joins and tokens: bounded by GC_MAX_MEMBERS */

#define TIMER_TOKEN_LOSS 0
#define TIMER_TOKEN_RETRANSMIT 1
#define TIMER_HOLD 2
#define TIMER_JOIN 3
#define TIMER_CONSENSUS 4
#define TIMER_MERGE_DETECT 5
#define TIMER_LOOPBACK 6
#define TIMER_STARTUP 7
#define TIMER_PROBE 8
#define TIMER_COUNT 9
#define NEVER UINT64_MAX

#define BUF_POOL_MAX 512                  /* free datagram buffers kept for reuse */
#define TICK_FIRE_MAX 64                  /* timer firings handled per tick call */

/* Sequence numbers wrap; compare them as corosync's sq_lt_compare does. */
static inline int seq_lt(uint32_t a, uint32_t b) { return (int32_t)(a - b) < 0; }
static inline int seq_lte(uint32_t a, uint32_t b) { return (int32_t)(a - b) <= 0; }
static inline int seq_gt(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }
static inline uint32_t seq_min(uint32_t a, uint32_t b) { return seq_lt(a, b) ? a : b; }
static inline uint32_t seq_max(uint32_t a, uint32_t b) { return seq_lt(a, b) ? b : a; }

typedef struct {
    uint32_t rep;
    uint64_t seq;
} ring_id_t;

static inline int ring_id_eq(ring_id_t a, ring_id_t b) { return a.rep == b.rep && a.seq == b.seq; }

/* ------------------------------------------------------------------ */
/* Node sets: sorted arrays of node ids                                */
/* ------------------------------------------------------------------ */

typedef struct {
    uint32_t n;
    uint32_t id[GC_MAX_MEMBERS];
} nodeset_t;

static int set_contains(const nodeset_t *s, uint32_t id)
{
    for (uint32_t i = 0; i < s->n; i++) {
        if (s->id[i] == id) return 1;
        if (s->id[i] > id) return 0;
    }
    return 0;
}

/* Returns 0 when the set is full (the id is not added). */
static int set_add(nodeset_t *s, uint32_t id)
{
    uint32_t i = 0;
    while (i < s->n && s->id[i] < id) i++;
    if (i < s->n && s->id[i] == id) return 1;
    if (s->n >= GC_MAX_MEMBERS) return 0;
    memmove(&s->id[i + 1], &s->id[i], (s->n - i) * sizeof(uint32_t));
    s->id[i] = id;
    s->n++;
    return 1;
}

static void set_remove(nodeset_t *s, uint32_t id)
{
    for (uint32_t i = 0; i < s->n; i++) {
        if (s->id[i] == id) {
            memmove(&s->id[i], &s->id[i + 1], (s->n - i - 1) * sizeof(uint32_t));
            s->n--;
            return;
        }
    }
}

static void set_merge(nodeset_t *dst, const nodeset_t *src)
{
    for (uint32_t i = 0; i < src->n; i++) set_add(dst, src->id[i]);
}

static void set_subtract(nodeset_t *out, const nodeset_t *a, const nodeset_t *b)
{
    out->n = 0;
    for (uint32_t i = 0; i < a->n; i++)
        if (!set_contains(b, a->id[i])) out->id[out->n++] = a->id[i];
}

static int set_equal(const nodeset_t *a, const nodeset_t *b)
{
    return a->n == b->n && memcmp(a->id, b->id, a->n * sizeof(uint32_t)) == 0;
}

static int set_subset(const nodeset_t *a, const nodeset_t *b)
{
    for (uint32_t i = 0; i < a->n; i++)
        if (!set_contains(b, a->id[i])) return 0;
    return 1;
}

static void set_single(nodeset_t *s, uint32_t id)
{
    s->n = 1;
    s->id[0] = id;
}

/* ------------------------------------------------------------------ */
/* Byte encoding (network byte order) with bounds-checked reads        */
/* ------------------------------------------------------------------ */

typedef struct {
    uint8_t *p;
} writer_t;

static inline void w_u8(writer_t *w, uint32_t v) { *w->p++ = (uint8_t)v; }
static inline void w_u16(writer_t *w, uint32_t v) { w->p[0] = (uint8_t)(v >> 8); w->p[1] = (uint8_t)v; w->p += 2; }
static inline void w_u32(writer_t *w, uint32_t v)
{
    w->p[0] = (uint8_t)(v >> 24); w->p[1] = (uint8_t)(v >> 16);
    w->p[2] = (uint8_t)(v >> 8); w->p[3] = (uint8_t)v; w->p += 4;
}
static inline void w_u64(writer_t *w, uint64_t v) { w_u32(w, (uint32_t)(v >> 32)); w_u32(w, (uint32_t)v); }
static inline void w_ring_id(writer_t *w, ring_id_t id) { w_u32(w, id.rep); w_u64(w, id.seq); }

typedef struct {
    const uint8_t *p;
    size_t left;
    int bad;
} reader_t;

static inline uint32_t r_u8(reader_t *r)
{
    if (r->left < 1) { r->bad = 1; return 0; }
    r->left--;
    return *r->p++;
}
static inline uint32_t r_u16(reader_t *r)
{
    if (r->left < 2) { r->bad = 1; r->left = 0; return 0; }
    uint32_t v = ((uint32_t)r->p[0] << 8) | r->p[1];
    r->p += 2; r->left -= 2;
    return v;
}
static inline uint32_t r_u32(reader_t *r)
{
    if (r->left < 4) { r->bad = 1; r->left = 0; return 0; }
    uint32_t v = ((uint32_t)r->p[0] << 24) | ((uint32_t)r->p[1] << 16) | ((uint32_t)r->p[2] << 8) | r->p[3];
    r->p += 4; r->left -= 4;
    return v;
}
static inline uint64_t r_u64(reader_t *r)
{
    uint64_t hi = r_u32(r);
    return (hi << 32) | r_u32(r);
}
static inline ring_id_t r_ring_id(reader_t *r)
{
    ring_id_t id;
    id.rep = r_u32(r);
    id.seq = r_u64(r);
    return id;
}

/* Reads a strictly ascending list of non-zero node ids. */
static int r_nodeset(reader_t *r, nodeset_t *s)
{
    uint32_t n = r_u16(r);
    if (r->bad || n > GC_MAX_MEMBERS) return -1;
    s->n = n;
    for (uint32_t i = 0; i < n; i++) {
        s->id[i] = r_u32(r);
        if (r->bad || s->id[i] == 0 || s->id[i] == UINT32_MAX) return -1;
        if (i > 0 && s->id[i] <= s->id[i - 1]) return -1;
    }
    return 0;
}

static void w_nodeset(writer_t *w, const nodeset_t *s)
{
    w_u16(w, s->n);
    for (uint32_t i = 0; i < s->n; i++) w_u32(w, s->id[i]);
}

/* ------------------------------------------------------------------ */
/* Parsed packets                                                       */
/* ------------------------------------------------------------------ */

typedef struct {
    uint32_t type;
    uint32_t sender;
} header_t;

typedef struct {
    ring_id_t ring_id;
    uint32_t token_seq;
    uint32_t seq;
    uint32_t aru;
    uint32_t aru_addr;
    uint32_t fcc;
    uint32_t backlog;
    uint32_t retrans_flg;
    uint32_t rtr_n;
    uint32_t rtr[GC_RTR_MAX];
} token_t;

typedef struct {
    ring_id_t ring_id;
    uint32_t seq;
    uint32_t flags;
    uint32_t count;          /* application entries (0 when encapsulated) */
    const uint8_t *body;     /* entries, or the inner datagram */
    size_t body_len;
} mcast_t;

typedef struct {
    uint64_t ring_seq;
    uint32_t flags;
    nodeset_t proc;
    nodeset_t fail;
} join_t;

typedef struct {
    ring_id_t ring_id;
    uint32_t aru;
    uint32_t high_delivered;
    uint32_t received_flg;
} commit_entry_t;

typedef struct {
    ring_id_t ring_id;
    uint32_t memb_index;
    nodeset_t memb;
    commit_entry_t entry[GC_MAX_MEMBERS];
} commit_t;

/* ------------------------------------------------------------------ */
/* Queues                                                               */
/* ------------------------------------------------------------------ */

/* One ring message kept for delivery and retransmission. */
typedef struct {
    uint8_t *buf;          /* the datagram as sent on the wire */
    uint32_t len;
    uint32_t seq;
    uint32_t origin;       /* original sender */
    uint8_t used;
    uint8_t flags;         /* MCAST_FLAG_* */
    uint32_t miss_seq;     /* which seq `miss` counts for */
    uint32_t miss;         /* token visits this seq has been missing */
} slot_t;

/* Circular sort queue indexed by seq & mask; holds seqs in [low, low + size). */
typedef struct {
    slot_t *slots;
    uint32_t size;
    uint32_t mask;
    uint32_t low;          /* last released + 1 */
} sortq_t;

/* Application messages waiting for the token, stored as wire entries. */
typedef struct {
    uint8_t *data;
    size_t head;
    size_t tail;
    size_t cap;
    size_t count;
} appq_t;

/* ------------------------------------------------------------------ */
/* The instance                                                          */
/* ------------------------------------------------------------------ */

struct gc_ring {
    gc_ring_config_t cfg;
    gc_ring_stats_t stats;
    int state;
    uint32_t me;
    size_t max_payload;

    /* membership */
    ring_id_t my_ring_id;          /* current ring (or the one being formed) */
    ring_id_t my_old_ring_id;      /* last installed ring */
    uint64_t ring_seq_max;         /* highest ring seq seen (corosync token_ring_id_seq) */
    nodeset_t my_memb;             /* members of the installed ring */
    nodeset_t my_new_memb;         /* members of the ring being formed */
    nodeset_t my_trans_memb;
    nodeset_t my_proc;
    nodeset_t my_fail;
    nodeset_t my_consensus;
    nodeset_t my_left;             /* members that announced a graceful leave */
    int have_installed;
    int failed_to_recv;

    /* back-off after a self-exclusion (one-way links, a partly deaf member) */
    uint32_t exclusions;           /* consecutive self-exclusions: the back-off exponent */
    int quarantined;               /* our singleton after one: merges only on evidence */
    int named_failed;              /* this round, a member we want put us in its fail set */
    uint32_t named_failed_rounds;  /* failed rounds since our last installation in which that happened */
    uint64_t backoff_until;        /* ... and not before this */
    uint64_t multi_since;          /* when we installed our last ring with others (0: none) */
    ring_id_t probe_ring;          /* the ring whose probe replies we are collecting */
    nodeset_t probe_memb;          /* its members, as its replies say */
    nodeset_t probe_heard;         /* those we heard reply since our last probe */
    uint64_t probe_replied_at;     /* we last answered someone's probe then */
    int originated_token;

    /* the current ring's message state */
    sortq_t regular;               /* installed ring (and old ring during recovery) */
    sortq_t recovery;              /* new ring's messages during recovery */
    uint32_t start_seq;            /* seq before the first message of a ring */
    uint32_t my_aru;
    uint32_t my_high_seq_received;
    uint32_t my_high_delivered;
    uint32_t my_last_aru;          /* token aru on the previous visit */
    uint32_t my_safe_upto;         /* safe: aru covered it on two successive visits */
    uint32_t rec_consumed;         /* recovery: contiguous encapsulated prefix */
    int have_token_seq;
    uint32_t my_token_seq;
    uint32_t rtr_cap;              /* retransmit requests a token may carry within mtu */
    int have_last_seq;
    uint32_t my_last_seq;
    uint32_t my_seq_unchanged;
    uint32_t my_aru_count;
    uint64_t aru_stuck_since;      /* when my_aru_count last started counting */
    int my_token_held;             /* non-rep: the ring looks idle (send hold-cancel) */
    int rep_holding;               /* rep: token parked in token_buf */

    /* flow control (corosync my_trc / my_pbl / my_cbl) */
    uint32_t my_trc;
    uint32_t my_pbl;
    uint32_t my_cbl;

    /* old ring state, saved at the first commit after operational */
    int old_saved;
    uint32_t old_aru;
    uint32_t old_high;
    uint32_t high_ring_delivered;
    int old_all_in_trans;          /* every old member is transitional */

    /* recovery */
    uint32_t *retrans;             /* old-ring seqs to re-broadcast encapsulated */
    size_t retrans_n;
    size_t retrans_head;
    int my_set_retrans_flg;
    uint32_t my_retrans_flg_count;
    uint32_t my_install_seq;
    uint32_t my_rotation_counter;

    /* outgoing application messages */
    appq_t appq;

    /* the last token (regular or commit) we sent, for retransmission and hold */
    uint8_t token_buf[CONTROL_BUF_LEN];
    size_t token_len;
    uint32_t token_dest;
    uint32_t token_retransmits;
    uint8_t loop_buf[CONTROL_BUF_LEN];
    size_t loop_len;

    /* timers */
    uint64_t deadline[TIMER_COUNT];
    uint64_t pause_flush_until;        /* after a pause: joins before this queued up during it */
    uint64_t startup_until;            /* a fresh member forms no ring before this */

    /* buffers */
    uint8_t **pool;
    size_t pool_n;
    size_t buf_cap;
    uint32_t keep_max;             /* ring messages kept for retransmission: retransmit_bytes / mtu,
                                      at least 2 * window_size, at most sort_queue_size */
    uint8_t scratch[CONTROL_BUF_LEN];

    /* outputs */
    gc_action_t *actions;
    size_t n_actions;
    size_t cap_actions;
    uint8_t *out;
    size_t out_len;
    size_t out_cap;
    int taken;
    int oom;
};

/* ------------------------------------------------------------------ */
/* Buffers and outputs                                                   */
/* ------------------------------------------------------------------ */

static uint8_t *buf_get(gc_ring_t *r)
{
    if (r->pool_n > 0) return r->pool[--r->pool_n];
    uint8_t *b = malloc(r->buf_cap);
    if (!b) r->oom = 1;
    return b;
}

static void buf_put(gc_ring_t *r, uint8_t *b)
{
    if (!b) return;
    if (r->pool_n < BUF_POOL_MAX) r->pool[r->pool_n++] = b;
    else free(b);
}

static void outputs_begin(gc_ring_t *r)
{
    if (r->taken) {
        r->n_actions = 0;
        r->out_len = 0;
        r->taken = 0;
    }
}

static int out_reserve(gc_ring_t *r, size_t extra)
{
    if (r->out_len + extra <= r->out_cap) return 0;
    size_t cap = r->out_cap ? r->out_cap : 65536;
    while (cap < r->out_len + extra) cap *= 2;
    uint8_t *p = realloc(r->out, cap);
    if (!p) { r->oom = 1; return -1; }
    r->out = p;
    r->out_cap = cap;
    return 0;
}

static gc_action_t *action_add(gc_ring_t *r, int kind, const void *data, size_t len)
{
    if (r->n_actions == r->cap_actions) {
        size_t cap = r->cap_actions ? r->cap_actions * 2 : 256;
        gc_action_t *a = realloc(r->actions, cap * sizeof(*a));
        if (!a) { r->oom = 1; return NULL; }
        r->actions = a;
        r->cap_actions = cap;
    }
    if (out_reserve(r, len) < 0) return NULL;
    gc_action_t *a = &r->actions[r->n_actions++];
    memset(a, 0, sizeof(*a));
    a->kind = (uint8_t)kind;
    a->offset = (uint32_t)r->out_len;
    a->len = (uint32_t)len;
    if (len) memcpy(r->out + r->out_len, data, len);
    r->out_len += len;
    return a;
}

static void emit_mcast(gc_ring_t *r, const uint8_t *pkt, size_t len)
{
    if (action_add(r, GC_ACT_SEND_MCAST, pkt, len)) {
        r->stats.packets_sent++;
        r->stats.bytes_sent += len;
    }
}

static void emit_unicast(gc_ring_t *r, uint32_t dest, const uint8_t *pkt, size_t len)
{
    gc_action_t *a = action_add(r, GC_ACT_SEND_UNICAST, pkt, len);
    if (a) {
        a->node = dest;
        r->stats.packets_sent++;
        r->stats.bytes_sent += len;
    }
}

static void emit_confchg(gc_ring_t *r, const nodeset_t *members, ring_id_t id, int transitional)
{
    uint8_t ids[GC_MAX_MEMBERS * 4];
    for (uint32_t i = 0; i < members->n; i++) {
        uint32_t v = members->id[i];
        ids[4 * i] = (uint8_t)v; ids[4 * i + 1] = (uint8_t)(v >> 8);
        ids[4 * i + 2] = (uint8_t)(v >> 16); ids[4 * i + 3] = (uint8_t)(v >> 24);
    }
    gc_action_t *a = action_add(r, GC_ACT_CONFCHG, ids, members->n * 4u);
    if (a) {
        a->node = id.rep;
        a->value = id.seq;
        a->count = (uint16_t)members->n;
        a->flags = transitional ? 1 : 0;
    }
}

/* Delivers every application entry of a (validated, non-encapsulated) datagram. */
static void deliver_datagram(gc_ring_t *r, const slot_t *s)
{
    if (s->flags & MCAST_FLAG_ENCAP) return;      /* recovery wrappers carry no application data */
    reader_t rd = { s->buf + MCAST_HDR_LEN, s->len - MCAST_HDR_LEN, 0 };
    while (rd.left >= ENTRY_HDR_LEN) {
        uint32_t flags = r_u8(&rd);
        uint32_t len = r_u16(&rd);
        if (len > rd.left) return;                  /* validated on receipt; never trust twice */
        gc_action_t *a = action_add(r, GC_ACT_DELIVER, rd.p, len);
        if (a) {
            a->node = s->origin;
            a->flags = (uint8_t)flags;              /* bit0 safe, bits 1-7 the layer's kind */
            a->value = s->seq;
        }
        rd.p += len;
        rd.left -= len;
        r->stats.messages_delivered++;
    }
}

/* ------------------------------------------------------------------ */
/* Sort queue                                                            */
/* ------------------------------------------------------------------ */

static int sq_init(sortq_t *q, uint32_t size)
{
    q->slots = calloc(size, sizeof(slot_t));
    if (!q->slots) return -1;
    q->size = size;
    q->mask = size - 1;
    q->low = 1;
    return 0;
}

static slot_t *sq_get(sortq_t *q, uint32_t seq)
{
    slot_t *s = &q->slots[seq & q->mask];
    return (s->used && s->seq == seq) ? s : NULL;
}

static int sq_in_window(const sortq_t *q, uint32_t seq)
{
    return !seq_lt(seq, q->low) && (uint32_t)(seq - q->low) < q->size;
}

static void sq_free_slot(gc_ring_t *r, slot_t *s)
{
    buf_put(r, s->buf);
    s->buf = NULL;
    s->used = 0;
}

static void sq_release_to(gc_ring_t *r, sortq_t *q, uint32_t upto)
{
    while (seq_lte(q->low, upto)) {
        slot_t *s = sq_get(q, q->low);
        if (s) sq_free_slot(r, s);
        q->low++;
    }
}

static void sq_reset(gc_ring_t *r, sortq_t *q, uint32_t start)
{
    for (uint32_t i = 0; i < q->size; i++)
        if (q->slots[i].used) sq_free_slot(r, &q->slots[i]);
    for (uint32_t i = 0; i < q->size; i++) q->slots[i].miss = 0;
    q->low = start + 1;
}

/* Stores a copy of a validated datagram. Returns 1 stored, 0 duplicate, -1 out of window. */
static int sq_store(gc_ring_t *r, sortq_t *q, uint32_t seq, uint32_t origin, uint32_t flags,
                    const uint8_t *pkt, size_t len)
{
    if (!sq_in_window(q, seq)) return seq_lt(seq, q->low) ? 0 : -1;
    slot_t *s = &q->slots[seq & q->mask];
    if (s->used) return 0;
    uint8_t *b = buf_get(r);
    if (!b) return -1;
    memcpy(b, pkt, len);
    s->buf = b;
    s->len = (uint32_t)len;
    s->seq = seq;
    s->origin = origin;
    s->flags = (uint8_t)flags;
    s->used = 1;
    return 1;
}

/* ------------------------------------------------------------------ */
/* Application queue                                                     */
/* ------------------------------------------------------------------ */

static int appq_push(appq_t *q, const uint8_t *payload, size_t len, unsigned flags)
{
    size_t need = ENTRY_HDR_LEN + len;
    if (q->tail + need > q->cap) {
        if (q->head > 0) {
            memmove(q->data, q->data + q->head, q->tail - q->head);
            q->tail -= q->head;
            q->head = 0;
        }
        if (q->tail + need > q->cap) {
            size_t cap = q->cap ? q->cap : 65536;
            while (cap < q->tail + need) cap *= 2;
            uint8_t *p = realloc(q->data, cap);
            if (!p) return -1;
            q->data = p;
            q->cap = cap;
        }
    }
    uint8_t *p = q->data + q->tail;
    p[0] = (uint8_t)flags;
    p[1] = (uint8_t)(len >> 8);
    p[2] = (uint8_t)len;
    if (len) memcpy(p + 3, payload, len);
    q->tail += need;
    q->count++;
    return 0;
}

static size_t appq_bytes(const appq_t *q) { return q->tail - q->head; }

/* ------------------------------------------------------------------ */
/* Timers                                                                */
/* ------------------------------------------------------------------ */

static void timer_set(gc_ring_t *r, int t, uint64_t at) { r->deadline[t] = at; }
static void timer_cancel(gc_ring_t *r, int t) { r->deadline[t] = NEVER; }
static int timer_armed(const gc_ring_t *r, int t) { return r->deadline[t] != NEVER; }

static void timer_after(gc_ring_t *r, int t, uint64_t now, uint64_t us)
{
    r->deadline[t] = (now > NEVER - us) ? NEVER - 1 : now + us;
}

static uint64_t earliest_deadline(const gc_ring_t *r)
{
    uint64_t d = NEVER;
    for (int t = 0; t < TIMER_COUNT; t++)
        if (r->deadline[t] < d) d = r->deadline[t];
    return d;
}

/* Pause detection (docs/design.rst, 'Pauses').  The driver calls us no later
   than our next deadline; a call pause_us or more past it means this process
   was stopped (SIGSTOP, a long GC, a VM stall), not that the others went
   quiet: what they sent meanwhile is still queued, unread.  So the timers that
   would blame them -- token loss and consensus -- restart from now, giving the
   queued packets (the token, perhaps) a chance first; and the joins we read in
   the next join period are dropped: they queued up during the pause and tell
   of rounds that are over (the others gave up on us; adopting that would make
   us give up on them), while the live ones are re-sent every join period.
   Corosync flushes its receive queue for the same reason. */
static void pause_check(gc_ring_t *r, uint64_t now)
{
    uint64_t due = earliest_deadline(r);
    if (due == NEVER || now < due || now - due < r->cfg.pause_us) return;
    r->stats.pauses_detected++;
    if (timer_armed(r, TIMER_TOKEN_LOSS)) timer_after(r, TIMER_TOKEN_LOSS, now, r->cfg.token_timeout_us);
    if (timer_armed(r, TIMER_CONSENSUS)) timer_after(r, TIMER_CONSENSUS, now, r->cfg.consensus_us);
    r->pause_flush_until = now + r->cfg.join_us;
}

/* ------------------------------------------------------------------ */
/* Encoders                                                              */
/* ------------------------------------------------------------------ */

static void w_header(const gc_ring_t *r, writer_t *w, uint32_t type, uint32_t sender)
{
    w_u16(w, WIRE_MAGIC);
    w_u8(w, WIRE_VERSION);
    w_u8(w, type);
    w_u32(w, r->cfg.cluster_id);
    w_u32(w, sender);
}

static size_t encode_token(const gc_ring_t *r, const token_t *t, uint8_t *buf)
{
    writer_t w = { buf };
    w_header(r, &w, MSG_TOKEN, r->me);
    w_ring_id(&w, t->ring_id);
    w_u32(&w, t->token_seq);
    w_u32(&w, t->seq);
    w_u32(&w, t->aru);
    w_u32(&w, t->aru_addr);
    w_u32(&w, t->fcc);
    w_u32(&w, t->backlog);
    w_u8(&w, t->retrans_flg);
    w_u8(&w, t->rtr_n);
    for (uint32_t i = 0; i < t->rtr_n; i++) w_u32(&w, t->rtr[i]);
    return (size_t)(w.p - buf);
}

static size_t encode_commit(const gc_ring_t *r, const commit_t *c, uint8_t *buf)
{
    writer_t w = { buf };
    w_header(r, &w, MSG_COMMIT, r->me);
    w_ring_id(&w, c->ring_id);
    w_u16(&w, c->memb_index);
    w_nodeset(&w, &c->memb);
    for (uint32_t i = 0; i < c->memb.n; i++) {
        w_ring_id(&w, c->entry[i].ring_id);
        w_u32(&w, c->entry[i].aru);
        w_u32(&w, c->entry[i].high_delivered);
        w_u8(&w, c->entry[i].received_flg);
    }
    return (size_t)(w.p - buf);
}

static size_t encode_join(const gc_ring_t *r, uint32_t flags, const nodeset_t *proc,
                          const nodeset_t *fail, uint8_t *buf)
{
    writer_t w = { buf };
    w_header(r, &w, MSG_JOIN, r->me);
    w_u64(&w, r->ring_seq_max);
    w_u8(&w, flags);
    w_nodeset(&w, proc);
    w_nodeset(&w, fail);
    return (size_t)(w.p - buf);
}

static size_t encode_ring_notice(const gc_ring_t *r, uint32_t type, uint8_t *buf)
{
    writer_t w = { buf };
    w_header(r, &w, type, r->me);
    w_ring_id(&w, r->my_ring_id);
    return (size_t)(w.p - buf);
}

static size_t encode_probe_reply(const gc_ring_t *r, uint8_t *buf)
{
    writer_t w = { buf };
    w_header(r, &w, MSG_PROBE_REPLY, r->me);
    w_ring_id(&w, r->my_ring_id);
    w_nodeset(&w, &r->my_memb);
    return (size_t)(w.p - buf);
}

static void w_mcast_header(const gc_ring_t *r, writer_t *w, uint32_t seq, uint32_t flags, uint32_t count)
{
    w_header(r, w, MSG_MCAST, r->me);
    w_ring_id(w, r->my_ring_id);
    w_u32(w, seq);
    w_u8(w, flags);
    w_u16(w, count);
}

/* ------------------------------------------------------------------ */
/* Decoders: validate completely, then hand out parsed values            */
/* ------------------------------------------------------------------ */

static int decode_header(gc_ring_t *r, reader_t *rd, header_t *h)
{
    if (rd->left < HDR_LEN) { r->stats.drop_truncated++; return GC_ETRUNCATED; }
    if (r_u16(rd) != WIRE_MAGIC) { r->stats.drop_bad_magic++; return GC_EBADMAGIC; }
    if (r_u8(rd) != WIRE_VERSION) { r->stats.drop_bad_version++; return GC_EBADVERSION; }
    h->type = r_u8(rd);
    uint32_t cluster = r_u32(rd);
    h->sender = r_u32(rd);
    if (cluster != r->cfg.cluster_id) { r->stats.drop_foreign_cluster++; return GC_EFOREIGN; }
    if (h->type == 0 || h->type >= MSG_TYPE_COUNT || h->sender == 0 || h->sender == UINT32_MAX) {
        r->stats.drop_malformed++;
        return GC_EMALFORMED;
    }
    return GC_OK;
}

static int malformed(gc_ring_t *r, const reader_t *rd)
{
    if (rd->bad) { r->stats.drop_truncated++; return GC_ETRUNCATED; }
    r->stats.drop_malformed++;
    return GC_EMALFORMED;
}

static int decode_token(gc_ring_t *r, reader_t *rd, token_t *t)
{
    t->ring_id = r_ring_id(rd);
    t->token_seq = r_u32(rd);
    t->seq = r_u32(rd);
    t->aru = r_u32(rd);
    t->aru_addr = r_u32(rd);
    t->fcc = r_u32(rd);
    t->backlog = r_u32(rd);
    t->retrans_flg = r_u8(rd);
    t->rtr_n = r_u8(rd);
    if (rd->bad || t->rtr_n > GC_RTR_MAX || t->retrans_flg > 1) return malformed(r, rd);
    for (uint32_t i = 0; i < t->rtr_n; i++) t->rtr[i] = r_u32(rd);
    if (rd->bad || rd->left != 0) return malformed(r, rd);
    /* a request must name a seq the token has already handed out */
    for (uint32_t i = 0; i < t->rtr_n; i++)
        if (seq_gt(t->rtr[i], t->seq)) return malformed(r, rd);
    if (seq_gt(t->aru, t->seq) || t->ring_id.rep == 0) return malformed(r, rd);
    return GC_OK;
}

/* Checks that `body` is a sequence of entries that fills it exactly. */
static int entries_valid(const uint8_t *body, size_t len, uint32_t count, int *any_safe)
{
    reader_t rd = { body, len, 0 };
    *any_safe = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t flags = r_u8(&rd);
        uint32_t n = r_u16(&rd);
        if (rd.bad || n > rd.left) return 0;
        if (flags & ENTRY_FLAG_SAFE) *any_safe = 1;
        rd.p += n;
        rd.left -= n;
    }
    return rd.left == 0;
}

static int decode_mcast_fields(reader_t *rd, mcast_t *m)
{
    m->ring_id = r_ring_id(rd);
    m->seq = r_u32(rd);
    m->flags = r_u8(rd);
    m->count = r_u16(rd);
    if (rd->bad) return -1;
    m->body = rd->p;
    m->body_len = rd->left;
    return 0;
}

/* Validates a non-encapsulated datagram body (entries and safe flag). */
static int mcast_plain_valid(const mcast_t *m)
{
    int any_safe;
    if (m->flags & ~(uint32_t)MCAST_FLAG_SAFE) return 0;
    if (m->count == 0 || !entries_valid(m->body, m->body_len, m->count, &any_safe)) return 0;
    return any_safe == !!(m->flags & MCAST_FLAG_SAFE);
}

static int decode_inner(const gc_ring_t *r, const uint8_t *buf, size_t len, header_t *h, mcast_t *m)
{
    reader_t rd = { buf, len, 0 };
    if (len < MCAST_HDR_LEN) return -1;
    if (r_u16(&rd) != WIRE_MAGIC || r_u8(&rd) != WIRE_VERSION) return -1;
    h->type = r_u8(&rd);
    if (r_u32(&rd) != r->cfg.cluster_id) return -1;
    h->sender = r_u32(&rd);
    if (h->type != MSG_MCAST || h->sender == 0 || h->sender == UINT32_MAX) return -1;
    if (decode_mcast_fields(&rd, m) < 0 || m->ring_id.rep == 0) return -1;
    return mcast_plain_valid(m) ? 0 : -1;
}

static int decode_mcast(gc_ring_t *r, reader_t *rd, mcast_t *m)
{
    /* Slot buffers hold buf_cap bytes: nothing we store may be larger. */
    if (rd->left + HDR_LEN > r->buf_cap) { r->stats.drop_malformed++; return GC_EMALFORMED; }
    if (decode_mcast_fields(rd, m) < 0) return malformed(r, rd);
    if (m->ring_id.rep == 0) return malformed(r, rd);
    if (m->flags & MCAST_FLAG_ENCAP) {
        header_t ih;
        mcast_t im;
        if (m->flags != MCAST_FLAG_ENCAP || m->count != 0) return malformed(r, rd);
        if (decode_inner(r, m->body, m->body_len, &ih, &im) < 0) return malformed(r, rd);
        return GC_OK;
    }
    return mcast_plain_valid(m) ? GC_OK : malformed(r, rd);
}

static int decode_join(gc_ring_t *r, reader_t *rd, uint32_t sender, join_t *j)
{
    j->ring_seq = r_u64(rd);
    j->flags = r_u8(rd);
    if (rd->bad || j->flags > JOIN_FLAG_LEAVE || j->ring_seq > JOIN_RING_SEQ_MAX) return malformed(r, rd);
    if (r_nodeset(rd, &j->proc) < 0 || r_nodeset(rd, &j->fail) < 0) return malformed(r, rd);
    if (rd->left != 0) return malformed(r, rd);
    if (j->flags & JOIN_FLAG_LEAVE) {
        if (set_contains(&j->proc, sender) || !set_contains(&j->fail, sender)) return malformed(r, rd);
    } else if (!set_contains(&j->proc, sender)) {
        return malformed(r, rd);
    }
    return GC_OK;
}

static int decode_commit(gc_ring_t *r, reader_t *rd, commit_t *c)
{
    c->ring_id = r_ring_id(rd);
    c->memb_index = r_u16(rd);
    if (rd->bad || r_nodeset(rd, &c->memb) < 0) return malformed(r, rd);
    if (c->memb.n == 0 || c->memb_index > c->memb.n || c->ring_id.rep != c->memb.id[0] ||
        c->ring_id.seq > RING_SEQ_MAX)
        return malformed(r, rd);
    for (uint32_t i = 0; i < c->memb.n; i++) {
        c->entry[i].ring_id = r_ring_id(rd);
        c->entry[i].aru = r_u32(rd);
        c->entry[i].high_delivered = r_u32(rd);
        c->entry[i].received_flg = r_u8(rd);
        if (!rd->bad && c->entry[i].received_flg > 1) return malformed(r, rd);
    }
    if (rd->bad || rd->left != 0) return malformed(r, rd);
    return GC_OK;
}

/* ------------------------------------------------------------------ */
/* Forward declarations of the state machine                            */
/* ------------------------------------------------------------------ */

static void gather_enter(gc_ring_t *r, uint64_t now);
static int round_failed_named(gc_ring_t *r, uint64_t now);
static void commit_enter(gc_ring_t *r, uint64_t now, commit_t *c);
static void recovery_enter(gc_ring_t *r, uint64_t now, const commit_t *c);
static void operational_enter(gc_ring_t *r, uint64_t now);
static void deliver_regular(gc_ring_t *r);
static int dispatch(gc_ring_t *r, uint64_t now, const uint8_t *buf, size_t len, int local);

/* ------------------------------------------------------------------ */
/* Sending tokens                                                        */
/* ------------------------------------------------------------------ */

static uint32_t successor(const nodeset_t *ring, uint32_t me)
{
    for (uint32_t i = 0; i < ring->n; i++)
        if (ring->id[i] == me) return ring->id[(i + 1) % ring->n];
    return me;
}

/* Sends the token held in token_buf to token_dest (or queues it to ourselves). */
static void token_transmit(gc_ring_t *r, uint64_t now)
{
    if (r->token_dest == r->me) {
        memcpy(r->loop_buf, r->token_buf, r->token_len);
        r->loop_len = r->token_len;
        timer_set(r, TIMER_LOOPBACK, now);
        timer_cancel(r, TIMER_TOKEN_RETRANSMIT);
        return;
    }
    emit_unicast(r, r->token_dest, r->token_buf, r->token_len);
    timer_after(r, TIMER_TOKEN_RETRANSMIT, now, r->cfg.token_retransmit_us);
}

static void token_send_new(gc_ring_t *r, uint64_t now, uint32_t dest, size_t len)
{
    r->token_len = len;
    r->token_dest = dest;
    r->token_retransmits = 0;
    token_transmit(r, now);
}

/* ------------------------------------------------------------------ */
/* Membership: gather                                                    */
/* ------------------------------------------------------------------ */

static void send_join(gc_ring_t *r)
{
    size_t len = encode_join(r, 0, &r->my_proc, &r->my_fail, r->scratch);
    emit_mcast(r, r->scratch, len);
}

static void commit_create(gc_ring_t *r, uint64_t now)
{
    commit_t c;
    memset(&c, 0, sizeof(c));
    set_subtract(&c.memb, &r->my_proc, &r->my_fail);
    c.ring_id.rep = r->me;
    c.ring_id.seq = r->ring_seq_max + RING_SEQ_STEP;   /* restarts use +1 */
    c.memb_index = 0;
    commit_enter(r, now, &c);
}

/* A member that excluded itself (failed to receive) cannot tell a repaired
   link from a broken one by merging: that re-forms every ring and the storm
   starts again.  Its singleton stays out (ignores joins and foreign packets,
   sends no merge detects) for a back-off that doubles with each exclusion in
   a row (exclusion_backoff_us up to exclusion_backoff_max_us), and after it
   merges only on evidence: it multicasts a probe every merge_us, members of
   other rings answer with their ring id and members, and once it has heard
   the answer of every member of one ring directly it merges with that ring. */
static void quarantine_start(gc_ring_t *r, uint64_t now)
{
    if (r->multi_since == 0 || now - r->multi_since >= r->cfg.exclusion_backoff_max_us) r->exclusions = 0;
    r->exclusions++;
    uint64_t backoff = r->cfg.exclusion_backoff_us;
    for (uint32_t i = 1; i < r->exclusions && backoff < r->cfg.exclusion_backoff_max_us; i++) backoff *= 2;
    if (backoff > r->cfg.exclusion_backoff_max_us) backoff = r->cfg.exclusion_backoff_max_us;
    r->quarantined = 1;
    r->backoff_until = now + backoff;
    memset(&r->probe_ring, 0, sizeof(r->probe_ring));
    r->probe_memb.n = r->probe_heard.n = 0;
    r->stats.backoffs++;
    timer_set(r, TIMER_PROBE, r->backoff_until);
}

static void quarantine_end(gc_ring_t *r)
{
    r->quarantined = 0;
    timer_cancel(r, TIMER_PROBE);
}

/* Quarantined and operational in our singleton: others' membership traffic is ignored. */
static int quarantine_holds(const gc_ring_t *r)
{
    return r->quarantined && r->state == GC_STATE_OPERATIONAL;
}

/* Consensus: every active member sent a join with our exact sets. */
static void consensus_check(gc_ring_t *r, uint64_t now)
{
    nodeset_t active;
    if (r->state != GC_STATE_GATHER) return;
    if (r->failed_to_recv) {
        /* Our join (fail set naming us) told the ring-mates; waiting for their
           agreement only kept the aru pinned and drew their joins. */
        r->failed_to_recv = 0;
        set_single(&r->my_proc, r->me);
        r->my_fail.n = 0;
        quarantine_start(r, now);
        commit_create(r, now);
        return;
    }
    set_subtract(&active, &r->my_proc, &r->my_fail);
    if (!set_subset(&active, &r->my_consensus)) return;
    if (!r->have_installed && now < r->startup_until) {
        /* A fresh member gathers for startup_wait before forming its first ring,
           so members started together form one ring rather than several. */
        timer_set(r, TIMER_STARTUP, r->startup_until);
        return;
    }
    /* Alone because members we wanted gave up on us (their joins named us
       failed, we gave up on them in turn): a failed round too, or the
       singleton would re-merge and fail again forever. */
    if (active.n == 1 && r->my_proc.n > 1 && r->named_failed && round_failed_named(r, now)) return;
    if (active.n > 0 && active.id[0] == r->me) commit_create(r, now);
}

static void gather_enter(gc_ring_t *r, uint64_t now)
{
    quarantine_end(r);
    r->state = GC_STATE_GATHER;
    r->stats.gather_entered++;
    r->originated_token = 0;
    r->rep_holding = 0;
    r->my_token_held = 0;
    set_add(&r->my_proc, r->me);
    send_join(r);
    timer_after(r, TIMER_JOIN, now, r->cfg.join_us);
    timer_after(r, TIMER_CONSENSUS, now, r->cfg.consensus_us);
    /* The consensus timer owns this state; an operational token-loss timer
       left running would expire consensus early and fail live members. */
    timer_cancel(r, TIMER_TOKEN_LOSS);
    timer_cancel(r, TIMER_TOKEN_RETRANSMIT);
    timer_cancel(r, TIMER_MERGE_DETECT);
    timer_cancel(r, TIMER_HOLD);
    timer_cancel(r, TIMER_LOOPBACK);
    timer_cancel(r, TIMER_STARTUP);
    set_single(&r->my_consensus, r->me);
    consensus_check(r, now);
}

/* Others gave up on us (a join of a member we want named us failed) and our
   round failed too, in two rounds since our last installation (once may be
   a race of a healing partition):
   the link between us works one way at most.  Mutual exclusion alone would
   let us pull the others into a new round forever, so we leave as a member
   that failed to receive does, into quarantine.  Returns 0 (nothing done)
   unless it left. */
static int round_failed_named(gc_ring_t *r, uint64_t now)
{
    int named = r->named_failed;
    r->named_failed = 0;
    if (!named) return 0;
    if (++r->named_failed_rounds < 2) return 0;
    r->named_failed_rounds = 0;
    r->stats.excluded_by_peers++;
    r->failed_to_recv = 1;
    set_add(&r->my_fail, r->me);
    gather_enter(r, now);
    return 1;
}

static void consensus_expired(gc_ring_t *r, uint64_t now)
{
    nodeset_t active;
    r->stats.consensus_timeouts++;
    set_subtract(&active, &r->my_proc, &r->my_fail);
    if (set_subset(&active, &r->my_consensus)) {
        /* Agreed, but the representative's commit token has not come: wait a token timeout. */
        set_single(&r->my_consensus, r->me);
        timer_after(r, TIMER_TOKEN_LOSS, now, r->cfg.token_timeout_us);
        timer_cancel(r, TIMER_CONSENSUS);
        return;
    }
    if (round_failed_named(r, now)) return;
    for (uint32_t i = 0; i < active.n; i++)
        if (!set_contains(&r->my_consensus, active.id[i])) set_add(&r->my_fail, active.id[i]);
    r->stats.continuous_gathers++;
    gather_enter(r, now);
}

/* Adds to the proc set unless the ring would outgrow max_members (the commit
   token must fit one datagram); members beyond it are left out. */
static int proc_add(gc_ring_t *r, uint32_t id)
{
    if (set_contains(&r->my_proc, id)) return 1;
    if (r->my_proc.n >= r->cfg.max_members) { r->stats.drop_ignored++; return 0; }
    return set_add(&r->my_proc, id);
}

/* Restarts gathering because of `sender`'s join, keeping its vote when its sets
   now equal ours: corosync drops it and waits a join period for the re-send. */
static void gather_restart_for(gc_ring_t *r, uint64_t now, uint32_t sender, const join_t *j)
{
    gather_enter(r, now);
    if (set_equal(&j->proc, &r->my_proc) && set_equal(&j->fail, &r->my_fail)) {
        set_add(&r->my_consensus, sender);
        consensus_check(r, now);
    }
}

/* Corosync's memb_join_process. */
static void join_process(gc_ring_t *r, uint64_t now, uint32_t sender, const join_t *j)
{
    if (set_equal(&j->proc, &r->my_proc) && set_equal(&j->fail, &r->my_fail)) {
        if (r->state == GC_STATE_OPERATIONAL) {
            gather_restart_for(r, now, sender, j);
        } else {
            set_add(&r->my_consensus, sender);
            consensus_check(r, now);
        }
        return;
    }
    if ((set_subset(&j->proc, &r->my_proc) && set_subset(&j->fail, &r->my_fail)) ||
        set_contains(&r->my_fail, sender)) {
        if (r->state == GC_STATE_OPERATIONAL) gather_enter(r, now);
        return;
    }
    nodeset_t proc_before = r->my_proc, fail_before = r->my_fail;
    for (uint32_t i = 0; i < j->proc.n; i++) proc_add(r, j->proc.id[i]);
    if (set_contains(&j->fail, r->me)) {
        set_add(&r->my_fail, sender);           /* it gave up on us: give up on it */
    } else if (set_contains(&r->my_memb, sender)) {
        set_merge(&r->my_fail, &j->fail);       /* trust a ring-mate's failure view */
    }
    if (!r->failed_to_recv) set_remove(&r->my_fail, r->me);
    /* Restart only on news.  Members that disagree about a failure without
       adopting each other's view would otherwise restart each other forever,
       a join storm in which consensus never accrues; the consensus timeout
       settles such disagreements. */
    if (set_equal(&proc_before, &r->my_proc) && set_equal(&fail_before, &r->my_fail)) {
        if (r->state == GC_STATE_OPERATIONAL) gather_enter(r, now);
        return;
    }
    gather_restart_for(r, now, sender, j);
}

/* Recovery failed: the old ring's state becomes current again. */
static void recovery_abort(gc_ring_t *r)
{
    r->my_aru = r->old_aru;
    r->my_high_seq_received = r->old_high;
    r->retrans_n = r->retrans_head = 0;
}

/* A leave (graceful), or a join whose fail set names its own sender: it
   excluded itself.  Either way only the sender drops out; the rest of its sets
   (a self-excluded member may have given up on others) is not adopted. */
static int handle_leave(gc_ring_t *r, uint64_t now, uint32_t sender, int graceful)
{
    if (!set_contains(&r->my_proc, sender) || set_contains(&r->my_fail, sender)) {
        r->stats.drop_ignored++;
        return GC_EIGNORED;
    }
    if (graceful) set_add(&r->my_left, sender);
    set_add(&r->my_fail, sender);
    switch (r->state) {
    case GC_STATE_RECOVERY:
        recovery_abort(r);
        /* fall through */
    case GC_STATE_OPERATIONAL:
    case GC_STATE_COMMIT:
    case GC_STATE_GATHER:
        gather_enter(r, now);
        break;
    default:
        break;
    }
    return GC_OK;
}

static int handle_join(gc_ring_t *r, uint64_t now, uint32_t sender, const join_t *j)
{
    if (j->ring_seq > r->ring_seq_max) r->ring_seq_max = j->ring_seq;
    if (j->flags & JOIN_FLAG_LEAVE) return handle_leave(r, now, sender, 1);
    if (now < r->pause_flush_until) {
        r->stats.drop_stale++;              /* queued while we were paused (pause_check) */
        return GC_ESTALE;
    }
    if (quarantine_holds(r)) { r->stats.drop_ignored++; return GC_EIGNORED; }
    if (set_contains(&j->fail, sender)) return handle_leave(r, now, sender, 0);
    if (set_contains(&j->fail, r->me) && set_contains(&r->my_proc, sender)) r->named_failed = 1;
    switch (r->state) {
    case GC_STATE_OPERATIONAL:
        /* corosync ignore_join_under_operational: it excluded us, or it is stale */
        if (set_contains(&j->fail, r->me)) { r->stats.drop_ignored++; return GC_EIGNORED; }
        if (set_contains(&r->my_memb, sender) && j->ring_seq < r->my_ring_id.seq) {
            r->stats.drop_stale++;
            return GC_ESTALE;
        }
        join_process(r, now, sender, j);
        return GC_OK;
    case GC_STATE_GATHER:
        join_process(r, now, sender, j);
        return GC_OK;
    case GC_STATE_COMMIT:
    case GC_STATE_RECOVERY:
        if (!set_contains(&r->my_new_memb, sender) || j->ring_seq < r->my_ring_id.seq) {
            r->stats.drop_ignored++;
            return GC_EIGNORED;
        }
        /* A new round: gather afresh (the last round's votes must not count,
           or they make an early commit token), then treat the join as any
           gathering member would. */
        if (r->state == GC_STATE_RECOVERY) recovery_abort(r);
        gather_enter(r, now);
        join_process(r, now, sender, j);
        return GC_OK;
    default:
        r->stats.drop_ignored++;
        return GC_EIGNORED;
    }
}

/* A packet from another ring: a partition healed, or a member restarted. */
static int foreign_seen(gc_ring_t *r, uint64_t now, uint32_t sender, ring_id_t ring)
{
    if (quarantine_holds(r)) { r->stats.drop_ignored++; return GC_EIGNORED; }
    switch (r->state) {
    case GC_STATE_OPERATIONAL:
        if (set_contains(&r->my_memb, sender) && ring.seq < r->my_ring_id.seq) {
            r->stats.drop_stale++;             /* delayed packet of an older ring */
            return GC_ESTALE;
        }
        if (!proc_add(r, sender)) return GC_EIGNORED;
        gather_enter(r, now);
        return GC_OK;
    case GC_STATE_GATHER:
        if (set_contains(&r->my_proc, sender)) { r->stats.drop_stale++; return GC_ESTALE; }
        if (!proc_add(r, sender)) return GC_EIGNORED;
        gather_enter(r, now);
        return GC_OK;
    default:
        r->stats.drop_stale++;
        return GC_ESTALE;
    }
}

/* ------------------------------------------------------------------ */
/* Membership: commit and recovery                                      */
/* ------------------------------------------------------------------ */

static int memb_index_of(const nodeset_t *s, uint32_t id)
{
    for (uint32_t i = 0; i < s->n; i++)
        if (s->id[i] == id) return (int)i;
    return -1;
}

static void old_ring_state_save(gc_ring_t *r)
{
    if (r->old_saved) return;
    r->old_saved = 1;
    r->old_aru = r->my_aru;
    r->old_high = r->my_high_seq_received;
}

static void commit_enter(gc_ring_t *r, uint64_t now, commit_t *c)
{
    old_ring_state_save(r);
    int idx = (int)c->memb_index;
    commit_entry_t *e = &c->entry[idx];
    e->ring_id = r->my_old_ring_id;
    e->aru = r->old_aru;
    e->high_delivered = r->my_high_delivered;
    e->received_flg = (r->old_aru == r->old_high);
    /* Members of one old ring behind the highest aru among them have holes. */
    uint32_t high_aru = e->aru;
    for (int i = 0; i <= idx; i++)
        if (ring_id_eq(c->entry[i].ring_id, e->ring_id)) high_aru = seq_max(high_aru, c->entry[i].aru);
    for (int i = 0; i <= idx; i++)
        if (ring_id_eq(c->entry[i].ring_id, e->ring_id) && seq_lt(c->entry[i].aru, high_aru))
            c->entry[i].received_flg = 0;
    c->memb_index++;

    r->my_new_memb = c->memb;
    r->my_ring_id = c->ring_id;
    if (c->ring_id.seq > r->ring_seq_max) r->ring_seq_max = c->ring_id.seq;
    timer_cancel(r, TIMER_JOIN);
    timer_cancel(r, TIMER_CONSENSUS);
    timer_cancel(r, TIMER_STARTUP);
    r->state = GC_STATE_COMMIT;
    r->stats.commit_entered++;
    r->my_trc = r->my_pbl = r->my_cbl = 0;
    size_t len = encode_commit(r, c, r->token_buf);
    token_send_new(r, now, c->memb.id[c->memb_index % c->memb.n], len);
    timer_after(r, TIMER_TOKEN_LOSS, now, r->cfg.token_timeout_us);
}

/* Which old-ring messages we re-send: those no lower-positioned transitional
   member is known (by its reported aru) to hold. */
static void recovery_plan(gc_ring_t *r, const commit_t *c, uint32_t low_ring_aru)
{
    int my_pos = memb_index_of(&c->memb, r->me);
    r->retrans_n = r->retrans_head = 0;
    if (r->cfg.mutation == 4) return;           /* mutation: skip old-ring recovery */
    if (seq_lt(low_ring_aru, r->regular.low - 1)) low_ring_aru = r->regular.low - 1;
    for (uint32_t s = low_ring_aru + 1; seq_lte(s, r->old_high) && sq_in_window(&r->regular, s); s++) {
        const slot_t *m = sq_get(&r->regular, s);
        if (!m || (m->flags & MCAST_FLAG_ENCAP)) continue;
        int covered = 0;
        for (int i = 0; i < my_pos; i++) {
            if (set_contains(&r->my_trans_memb, c->memb.id[i]) && seq_lte(s, c->entry[i].aru)) {
                covered = 1;
                break;
            }
        }
        if (!covered) r->retrans[r->retrans_n++] = s;
    }
}

static void recovery_enter(gc_ring_t *r, uint64_t now, const commit_t *c)
{
    r->state = GC_STATE_RECOVERY;
    r->stats.recovery_entered++;
    r->my_trans_memb.n = 0;
    for (uint32_t i = 0; i < c->memb.n; i++) {
        if (ring_id_eq(c->entry[i].ring_id, r->my_old_ring_id) && set_contains(&r->my_memb, c->memb.id[i]))
            set_add(&r->my_trans_memb, c->memb.id[i]);
    }
    int need = 0;
    uint32_t low_ring_aru = r->old_high;
    r->high_ring_delivered = r->my_high_delivered;
    for (uint32_t i = 0; i < c->memb.n; i++) {
        if (!set_contains(&r->my_trans_memb, c->memb.id[i])) continue;
        if (!c->entry[i].received_flg) need = 1;
        low_ring_aru = seq_min(low_ring_aru, c->entry[i].aru);
        r->high_ring_delivered = seq_max(r->high_ring_delivered, c->entry[i].high_delivered);
    }
    r->old_all_in_trans = set_subset(&r->my_memb, &r->my_trans_memb);
    if (need) recovery_plan(r, c, low_ring_aru);
    else r->retrans_n = r->retrans_head = 0;

    /* The new ring's message state. */
    r->start_seq = r->cfg.initial_seq;
    sq_reset(r, &r->recovery, r->start_seq);
    r->my_aru = r->my_high_seq_received = r->rec_consumed = r->start_seq;
    r->my_last_aru = r->my_safe_upto = r->start_seq;
    r->have_token_seq = 0;
    r->have_last_seq = 0;
    r->my_seq_unchanged = r->my_aru_count = 0;
    r->my_set_retrans_flg = 0;
    r->my_retrans_flg_count = r->my_rotation_counter = 0;
    r->my_install_seq = r->start_seq;
    r->originated_token = 0;
    r->my_trc = r->my_pbl = r->my_cbl = 0;

    size_t len = encode_commit(r, c, r->token_buf);
    token_send_new(r, now, successor(&c->memb, r->me), len);
    timer_after(r, TIMER_TOKEN_LOSS, now, r->cfg.token_timeout_us);
}

static void send_initial_token(gc_ring_t *r, uint64_t now)
{
    token_t t;
    memset(&t, 0, sizeof(t));
    t.ring_id = r->my_ring_id;
    t.token_seq = r->cfg.initial_token_seq;
    t.seq = r->start_seq;
    t.aru = r->start_seq;
    t.aru_addr = 0;
    size_t len = encode_token(r, &t, r->token_buf);
    token_send_new(r, now, successor(&r->my_new_memb, r->me), len);
    timer_after(r, TIMER_TOKEN_LOSS, now, r->cfg.token_timeout_us);
}

/* A member of our old ring cannot report an aru (or delivery point) below what
   we released as stable everywhere, nor beyond our window: such an entry is
   forged, and acting on it would make recovery walk 2^31 seqs. */
static int commit_entries_plausible(const gc_ring_t *r, const commit_t *c)
{
    uint32_t released = r->regular.low - 1;
    for (uint32_t i = 0; i < c->memb.n; i++) {
        const commit_entry_t *e = &c->entry[i];
        if (i >= c->memb_index && c->memb_index < c->memb.n) break;   /* not filled in yet */
        if (!ring_id_eq(e->ring_id, r->my_old_ring_id) || !r->have_installed) continue;
        if (seq_lt(e->aru, released) || (uint32_t)(e->aru - released) > r->regular.size) return 0;
        /* delivery may lag (safe messages), so high_delivered has no lower bound */
        if (seq_gt(e->high_delivered, released) && (uint32_t)(e->high_delivered - released) > r->regular.size)
            return 0;
    }
    return 1;
}

static int handle_commit(gc_ring_t *r, uint64_t now, commit_t *c)
{
    int pos = memb_index_of(&c->memb, r->me);
    if (pos < 0) { r->stats.drop_ignored++; return GC_EIGNORED; }
    if (!commit_entries_plausible(r, c)) { r->stats.drop_malformed++; return GC_EMALFORMED; }
    switch (r->state) {
    case GC_STATE_GATHER: {
        nodeset_t active;
        set_subtract(&active, &r->my_proc, &r->my_fail);
        if (set_equal(&c->memb, &active) && c->ring_id.seq > r->my_ring_id.seq &&
            c->memb_index == (uint32_t)pos) {
            commit_enter(r, now, c);
            return GC_OK;
        }
        break;
    }
    case GC_STATE_COMMIT:
        if (ring_id_eq(c->ring_id, r->my_ring_id) && c->memb_index == c->memb.n &&
            set_equal(&c->memb, &r->my_new_memb)) {
            recovery_enter(r, now, c);
            return GC_OK;
        }
        break;
    case GC_STATE_RECOVERY:
        if (r->me == r->my_ring_id.rep && ring_id_eq(c->ring_id, r->my_ring_id) &&
            c->memb_index == c->memb.n && !r->originated_token) {
            r->originated_token = 1;
            send_initial_token(r, now);
            return GC_OK;
        }
        break;
    default:
        break;
    }
    r->stats.drop_stale++;
    return GC_ESTALE;
}

/* ------------------------------------------------------------------ */
/* Installation (EVS delivery order)                                    */
/* ------------------------------------------------------------------ */

static int datagram_safe(const gc_ring_t *r, const slot_t *s)
{
    return (s->flags & MCAST_FLAG_SAFE) && r->cfg.mutation != 3;
}

static void old_ring_deliver(gc_ring_t *r)
{
    uint32_t s = r->my_high_delivered + 1;
    /* In the old regular configuration: up to the first hole, or the first safe
       message we cannot show every old member received. */
    for (; seq_lte(s, r->old_high); s++) {
        slot_t *m = sq_get(&r->regular, s);
        if (!m) break;
        if (m->flags & MCAST_FLAG_ENCAP) { r->my_high_delivered = s; continue; }
        if (datagram_safe(r, m) && !r->old_all_in_trans && seq_gt(s, r->high_ring_delivered)) break;
        deliver_datagram(r, m);
        r->my_high_delivered = s;
    }
    emit_confchg(r, &r->my_trans_memb, r->my_ring_id, 1);
    /* In the transitional configuration: the rest; after a hole only messages
       from transitional members, since others may depend on the missing one. */
    int hole = 0;
    for (; seq_lte(s, r->old_high); s++) {
        slot_t *m = sq_get(&r->regular, s);
        if (!m) { hole = 1; continue; }
        if (m->flags & MCAST_FLAG_ENCAP) continue;
        if (!hole || set_contains(&r->my_trans_memb, m->origin)) deliver_datagram(r, m);
    }
}

static void operational_enter(gc_ring_t *r, uint64_t now)
{
    if (r->have_installed) old_ring_deliver(r);
    emit_confchg(r, &r->my_new_memb, r->my_ring_id, 0);

    /* The recovery queue becomes the regular queue. */
    sq_reset(r, &r->regular, 0);
    sortq_t tmp = r->regular;
    r->regular = r->recovery;
    r->recovery = tmp;
    r->my_high_delivered = r->rec_consumed;

    r->my_memb = r->my_new_memb;
    r->my_proc = r->my_new_memb;
    r->my_fail.n = 0;
    r->my_left.n = 0;
    r->my_old_ring_id = r->my_ring_id;
    r->old_saved = 0;
    r->have_installed = 1;
    r->failed_to_recv = 0;
    r->named_failed = 0;
    /* A singleton says nothing about the link that failed the round: the
       singleton a failed round leaves us in must not forget that round, or a
       member the others cannot hear re-merges (their packets reach it) and
       fails again forever, one failed round per installation. */
    if (r->my_new_memb.n > 1) r->named_failed_rounds = 0;
    r->multi_since = r->my_memb.n > 1 ? now : 0;
    r->retrans_n = r->retrans_head = 0;
    r->state = GC_STATE_OPERATIONAL;
    r->stats.operational_entered++;
    r->stats.continuous_gathers = 0;
    deliver_regular(r);
}

/* ------------------------------------------------------------------ */
/* Ordered delivery in the operational state                            */
/* ------------------------------------------------------------------ */

static void deliver_regular(gc_ring_t *r)
{
    uint32_t upto = (r->cfg.mutation == 2) ? r->my_high_seq_received : r->my_aru;
    while (seq_lt(r->my_high_delivered, upto)) {
        uint32_t s = r->my_high_delivered + 1;
        slot_t *m = sq_get(&r->regular, s);
        if (!m) { r->my_high_delivered = s; continue; }   /* only under mutation 2 */
        if (!(m->flags & MCAST_FLAG_ENCAP)) {
            if (datagram_safe(r, m) && seq_gt(s, r->my_safe_upto)) break;
            deliver_datagram(r, m);
        }
        r->my_high_delivered = s;
    }
}

static void aru_advance(gc_ring_t *r, sortq_t *q)
{
    while (sq_get(q, r->my_aru + 1)) r->my_aru++;
}

/* An old-ring message re-sent during recovery: keep it if it is from our old ring. */
static void decapsulate(gc_ring_t *r, const slot_t *s)
{
    header_t ih;
    mcast_t im;
    const uint8_t *inner = s->buf + MCAST_HDR_LEN;
    size_t inner_len = s->len - MCAST_HDR_LEN;
    if (decode_inner(r, inner, inner_len, &ih, &im) < 0) return;
    if (!ring_id_eq(im.ring_id, r->my_old_ring_id) && r->cfg.mutation != 5) return;
    if (sq_store(r, &r->regular, im.seq, ih.sender, im.flags, inner, inner_len) == 1) {
        r->old_high = seq_max(r->old_high, im.seq);
        while (sq_get(&r->regular, r->old_aru + 1)) r->old_aru++;
    }
}

static void recovery_consume(gc_ring_t *r)
{
    for (;;) {
        slot_t *s = sq_get(&r->recovery, r->rec_consumed + 1);
        if (!s || !(s->flags & MCAST_FLAG_ENCAP)) break;
        r->rec_consumed++;
    }
}

/* The ring whose messages the queue we store into holds: the recovery queue
   belongs to the ring being formed, the regular queue to the last installed
   ring.  They differ from my_ring_id after an aborted round, which leaves
   my_ring_id naming the aborted ring: its late messages (a recovery wrapper at
   seq 1, say) must not land in the installed ring's queue at the same seq,
   where the genuine message would later be refused as a duplicate (see
   docs/design.rst, 'Aborted rounds'). */
static ring_id_t queue_ring_id(const gc_ring_t *r)
{
    return r->state == GC_STATE_RECOVERY ? r->my_ring_id : r->my_old_ring_id;
}

static int handle_mcast(gc_ring_t *r, uint64_t now, uint32_t sender, const mcast_t *m,
                        const uint8_t *pkt, size_t len)
{
    if (!ring_id_eq(m->ring_id, queue_ring_id(r))) {
        /* A recovery wrapper of another ring is never news: its sender is
           forming that ring and will announce it (messages, merge detects)
           once installed.  Late copies of one must change nothing. */
        if (m->flags & MCAST_FLAG_ENCAP) { r->stats.drop_stale++; return GC_ESTALE; }
        return foreign_seen(r, now, sender, m->ring_id);
    }
    sortq_t *q;
    switch (r->state) {
    case GC_STATE_OPERATIONAL:
    case GC_STATE_GATHER:
        if (!set_contains(&r->my_memb, sender)) { r->stats.drop_malformed++; return GC_EMALFORMED; }
        q = &r->regular;
        break;
    case GC_STATE_RECOVERY:
        if (!set_contains(&r->my_new_memb, sender)) { r->stats.drop_malformed++; return GC_EMALFORMED; }
        q = &r->recovery;
        break;
    default:
        r->stats.drop_ignored++;
        return GC_EIGNORED;
    }
    int stored = sq_store(r, q, m->seq, sender, m->flags, pkt, len);
    if (stored == 0) { r->stats.drop_duplicate++; return GC_ESTALE; }
    if (stored < 0) {
        if (r->oom) return GC_ENOMEM;
        r->stats.drop_out_of_window++;
        return GC_ESTALE;
    }
    r->my_high_seq_received = seq_max(r->my_high_seq_received, m->seq);
    aru_advance(r, q);
    if (r->state == GC_STATE_RECOVERY) {
        slot_t *s = sq_get(q, m->seq);
        if (s->flags & MCAST_FLAG_ENCAP) decapsulate(r, s);
        recovery_consume(r);
    } else if (r->state == GC_STATE_OPERATIONAL) {
        deliver_regular(r);
    }
    return GC_OK;
}

/* ------------------------------------------------------------------ */
/* The regular token                                                    */
/* ------------------------------------------------------------------ */

/* Datagrams our queue needs: the backlog we report on the token. */
static uint32_t backlog_get(const gc_ring_t *r)
{
    if (r->state == GC_STATE_RECOVERY) return (uint32_t)(r->retrans_n - r->retrans_head);
    size_t bytes = appq_bytes(&r->appq);
    size_t cap = r->cfg.mtu - 2 * MCAST_HDR_LEN;
    return (uint32_t)((bytes + cap - 1) / cap);
}

/* corosync fcc_calculate: per-visit budget from window, max_messages and fair share. */
static uint32_t fcc_calculate(gc_ring_t *r, const token_t *t)
{
    uint32_t allowed = r->cfg.max_messages;
    uint32_t room = t->fcc >= r->cfg.window_size ? 0 : r->cfg.window_size - t->fcc;
    if (allowed > room) allowed = room;
    r->my_cbl = backlog_get(r);
    int64_t total = (int64_t)t->backlog + r->my_cbl - r->my_pbl;
    if (total > 0) {
        uint64_t share = ((uint64_t)r->cfg.window_size * r->my_pbl) / (uint64_t)total;
        if (share > 0 && allowed > share) allowed = (uint32_t)share;
    }
    return allowed;
}

/* Keep the in-flight window inside the sort queue (corosync fcc_rtr_limit)
   and inside retransmit_bytes: every message from the oldest one we still
   keep to the token's seq takes an mtu-sized buffer at each member (plus up
   to window_size stamped by others before they see this token), so nobody
   stamps a new one while keep_max would be passed. */
static uint32_t window_limit(const gc_ring_t *r, const sortq_t *q, const token_t *t, uint32_t allowed)
{
    uint32_t last_released = q->low - 1;
    uint32_t used = seq_lt(t->seq, last_released) ? 0 : t->seq - last_released;
    uint32_t cap = q->size < r->keep_max ? q->size : r->keep_max;
    if ((uint64_t)used + allowed + r->cfg.window_size > cap) return 0;
    return allowed;
}

static void retransmit_requested(gc_ring_t *r, token_t *t, sortq_t *q, uint32_t *budget)
{
    uint32_t kept = 0;
    for (uint32_t i = 0; i < t->rtr_n; i++) {
        slot_t *s = (*budget > 0 && r->cfg.mutation != 6) ? sq_get(q, t->rtr[i]) : NULL;
        if (s) {
            emit_mcast(r, s->buf, s->len);
            r->stats.retransmissions++;
            (*budget)--;
        } else {
            t->rtr[kept++] = t->rtr[i];
        }
    }
    t->rtr_n = kept;
}

static int rtr_has(const token_t *t, uint32_t seq)
{
    for (uint32_t i = 0; i < t->rtr_n; i++)
        if (t->rtr[i] == seq) return 1;
    return 0;
}

/* A hole still missing after being requested is asked for again on visits
   1, 2, 4, 8 ... after the first request, then every RTR_BACKOFF_MAX visits:
   a member that cannot be repaired (it does not hear the retransmitter) must
   not spend the ring's budget on the same retransmissions every visit. */
#define RTR_BACKOFF_MAX 16u

static int rtr_due(uint32_t since_first)
{
    if (since_first < RTR_BACKOFF_MAX) return (since_first & (since_first - 1)) == 0;
    return since_first % RTR_BACKOFF_MAX == 0;
}

/* Ask for holes that persisted miss_count_const visits. */
static void request_missing(gc_ring_t *r, token_t *t, sortq_t *q)
{
    uint32_t from = r->my_aru + 1;
    if (!seq_lte(from, t->seq)) return;
    uint32_t span = t->seq - r->my_aru;
    if (span > q->size) span = q->size;
    for (uint32_t k = 0; k < span && t->rtr_n < r->rtr_cap; k++) {
        uint32_t seq = from + k;
        if (!sq_in_window(q, seq)) break;
        slot_t *s = &q->slots[seq & q->mask];
        if (s->used && s->seq == seq) continue;
        if (s->miss_seq != seq) { s->miss_seq = seq; s->miss = 0; }
        if (++s->miss < r->cfg.miss_count_const) continue;
        if (!rtr_due(s->miss - r->cfg.miss_count_const)) continue;
        if (!rtr_has(t, seq)) {
            t->rtr[t->rtr_n++] = seq;
            r->stats.retransmit_requests++;
        }
    }
}

/* The slot for a seq we are about to stamp.  Only the token holder stamps, so
   it is normally free; a forged packet of our ring could have taken it, and
   the token's seq wins. */
static slot_t *slot_for_origin(gc_ring_t *r, sortq_t *q, uint32_t seq)
{
    slot_t *s = &q->slots[seq & q->mask];
    if (s->used) sq_free_slot(r, s);
    return s;
}

/* Packs queued application messages into one datagram and stamps it. */
static void originate_regular(gc_ring_t *r, token_t *t, sortq_t *q)
{
    uint8_t *b = buf_get(r);
    if (!b) return;
    appq_t *a = &r->appq;
    size_t room = r->cfg.mtu - 2 * MCAST_HDR_LEN;    /* recovery may wrap it in another header */
    size_t used = 0;
    uint32_t count = 0, flags = 0;
    while (a->count > 0) {
        const uint8_t *e = a->data + a->head + used;
        size_t n = ENTRY_HDR_LEN + (((size_t)e[1] << 8) | e[2]);
        if (used + n > room) break;
        if (e[0] & ENTRY_FLAG_SAFE) flags |= MCAST_FLAG_SAFE;
        used += n;
        count++;
        a->count--;
    }
    uint32_t seq = ++t->seq;
    writer_t w = { b };
    w_mcast_header(r, &w, seq, flags, count);
    memcpy(w.p, a->data + a->head, used);
    a->head += used;
    if (a->count == 0) a->head = a->tail = 0;
    size_t len = MCAST_HDR_LEN + used;
    slot_t *s = slot_for_origin(r, q, seq);
    s->buf = b;
    s->len = (uint32_t)len;
    s->seq = seq;
    s->origin = r->me;
    s->flags = (uint8_t)flags;
    s->used = 1;
    if (!r->quarantined) emit_mcast(r, b, len);     /* a quarantined singleton stays unseen */
    r->stats.datagrams_originated++;
}

/* Re-broadcasts one old-ring message, encapsulated, on the new ring. */
static void originate_recovery(gc_ring_t *r, token_t *t, sortq_t *q)
{
    uint32_t old_seq = r->retrans[r->retrans_head++];
    slot_t *old = sq_get(&r->regular, old_seq);
    if (!old) return;
    uint8_t *b = buf_get(r);
    if (!b) return;
    uint32_t seq = ++t->seq;
    writer_t w = { b };
    w_mcast_header(r, &w, seq, MCAST_FLAG_ENCAP, 0);
    memcpy(w.p, old->buf, old->len);
    size_t len = MCAST_HDR_LEN + old->len;
    slot_t *s = slot_for_origin(r, q, seq);
    s->buf = b;
    s->len = (uint32_t)len;
    s->seq = seq;
    s->origin = r->me;
    s->flags = MCAST_FLAG_ENCAP;
    s->used = 1;
    if (!r->quarantined) emit_mcast(r, b, len);
    r->stats.datagrams_originated++;
}

static uint32_t originate(gc_ring_t *r, token_t *t, sortq_t *q, uint32_t budget)
{
    uint32_t sent = 0;
    while (sent < budget) {
        if (r->state == GC_STATE_OPERATIONAL) {
            if (r->appq.count == 0) break;
            originate_regular(r, t, q);
        } else {
            if (r->retrans_head >= r->retrans_n) break;
            originate_recovery(r, t, q);
        }
        if (r->oom) break;
        sent++;
    }
    if (sent) {
        r->my_high_seq_received = seq_max(r->my_high_seq_received, t->seq);
        aru_advance(r, q);
    }
    return sent;
}

static uint32_t clamp_u32(int64_t v)
{
    return v < 0 ? 0 : (v > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)v);
}

/* Returns 1 when the new ring may be installed (recovery is complete). */
static int recovery_progress(gc_ring_t *r, token_t *t)
{
    if (r->retrans_head < r->retrans_n) {
        t->retrans_flg = 1;
        r->my_set_retrans_flg = 1;
    } else if (t->retrans_flg && r->my_set_retrans_flg) {
        t->retrans_flg = 0;
        r->my_set_retrans_flg = 0;
    }
    r->my_retrans_flg_count = t->retrans_flg ? 0 : r->my_retrans_flg_count + 1;
    if (r->my_retrans_flg_count == 2) r->my_install_seq = t->seq;
    if (r->my_retrans_flg_count >= 3 && seq_lte(r->my_install_seq, t->aru)) r->my_rotation_counter++;
    else r->my_rotation_counter = 0;
    return r->my_rotation_counter >= 2;
}

static int handle_token(gc_ring_t *r, uint64_t now, token_t *t, int reprocess)
{
    if (r->state != GC_STATE_OPERATIONAL && r->state != GC_STATE_RECOVERY) {
        r->stats.drop_ignored++;
        return GC_EIGNORED;
    }
    if (!ring_id_eq(t->ring_id, r->my_ring_id)) { r->stats.drop_stale++; return GC_ESTALE; }
    if (r->have_token_seq && !seq_gt(t->token_seq, r->my_token_seq) && r->cfg.mutation != 1) {
        r->stats.drop_duplicate++;
        return GC_ESTALE;
    }
    /* Accepted: everything below acts on a validated, fresh token. */
    r->stats.tokens_received++;
    sortq_t *q = (r->state == GC_STATE_RECOVERY) ? &r->recovery : &r->regular;
    timer_cancel(r, TIMER_TOKEN_RETRANSMIT);
    timer_cancel(r, TIMER_HOLD);
    r->rep_holding = 0;

    uint32_t last_aru = r->my_last_aru;
    if (!reprocess) {
        uint32_t stable = seq_min(seq_min(t->aru, last_aru), r->my_high_delivered);
        if (r->state == GC_STATE_RECOVERY) stable = seq_min(seq_min(t->aru, last_aru), r->rec_consumed);
        if (seq_gt(stable, q->low - 1)) sq_release_to(r, q, stable);
        if (r->have_last_seq && t->seq == r->my_last_seq) {
            r->my_seq_unchanged++;
        } else {
            r->my_seq_unchanged = 0;
            timer_cancel(r, TIMER_MERGE_DETECT);
        }
        r->my_safe_upto = seq_max(r->my_safe_upto, seq_min(last_aru, t->aru));
        r->my_last_aru = t->aru;
    } else {
        r->my_seq_unchanged = 0;
    }
    r->have_last_seq = 1;
    r->my_last_seq = t->seq;

    uint32_t budget = fcc_calculate(r, t);
    uint32_t budget_before = budget;
    retransmit_requested(r, t, q, &budget);
    uint32_t retransmitted = budget_before - budget;
    request_missing(r, t, q);
    budget = window_limit(r, q, t, budget);
    uint32_t sent = retransmitted + originate(r, t, q, budget);

    t->fcc = clamp_u32((int64_t)t->fcc + sent - r->my_trc);
    t->backlog = clamp_u32((int64_t)t->backlog + r->my_cbl - r->my_pbl);
    r->my_trc = sent;
    r->my_pbl = r->my_cbl;

    if (seq_lt(r->my_aru, t->aru) || t->aru_addr == r->me || t->aru_addr == 0) {
        t->aru = r->my_aru;
        t->aru_addr = (t->aru == t->seq) ? 0 : r->me;
    }
    if (!reprocess) {
        if (t->aru == last_aru && t->aru_addr != 0) {
            if (r->my_aru_count++ == 0) r->aru_stuck_since = now;
        } else {
            r->my_aru_count = 0;
        }
        /* Rotations alone are no time bound (they are quick when requests back
           off and the token is not held): also two token timeouts stuck. */
        if (r->my_aru_count > r->cfg.fail_recv_const && t->aru_addr == r->me &&
            now - r->aru_stuck_since >= 2 * r->cfg.token_timeout_us) {
            /* We cannot get what everyone else has: leave and form our own ring. */
            r->stats.failed_to_receive++;
            r->failed_to_recv = 1;
            set_add(&r->my_fail, r->me);
            if (r->state == GC_STATE_RECOVERY) recovery_abort(r);
            gather_enter(r, now);
            return GC_OK;
        }
    }

    int install = (r->state == GC_STATE_RECOVERY) && recovery_progress(r, t);

    r->my_token_seq = t->token_seq;
    r->have_token_seq = 1;
    t->token_seq++;

    nodeset_t *ring = (r->state == GC_STATE_RECOVERY) ? &r->my_new_memb : &r->my_memb;
    /* A stuck aru (aru_addr set) keeps the token moving though requests back
       off: failure to receive counts rotations. */
    int idle = r->state == GC_STATE_OPERATIONAL && t->rtr_n == 0 && t->aru_addr == 0 && r->appq.count == 0 &&
               r->my_seq_unchanged > r->cfg.seqno_unchanged_const;
    int rep = (r->me == r->my_ring_id.rep);
    r->my_token_held = r->state == GC_STATE_OPERATIONAL && !rep &&
                       r->my_seq_unchanged + 1 >= r->cfg.seqno_unchanged_const;
    r->token_len = encode_token(r, t, r->token_buf);
    r->token_dest = successor(ring, r->me);
    r->token_retransmits = 0;
    if (idle && rep) {
        r->rep_holding = 1;
        r->stats.token_holds++;
        timer_after(r, TIMER_HOLD, now, r->cfg.hold_us);
        if (!timer_armed(r, TIMER_MERGE_DETECT)) timer_after(r, TIMER_MERGE_DETECT, now, r->cfg.merge_us);
    } else {
        token_transmit(r, now);
    }
    timer_after(r, TIMER_TOKEN_LOSS, now, r->cfg.token_timeout_us);

    if (r->state == GC_STATE_OPERATIONAL) deliver_regular(r);
    if (install) operational_enter(r, now);
    return GC_OK;
}

/* Releases a token the idle representative parked: process it again at once
   if we have work of our own, so the first message after idleness waits for no
   extra rotation. */
static void hold_release(gc_ring_t *r, uint64_t now, int have_work)
{
    if (!r->rep_holding) return;
    r->rep_holding = 0;
    timer_cancel(r, TIMER_HOLD);
    if (have_work) {
        token_t t;
        reader_t rd = { r->token_buf + HDR_LEN, r->token_len - HDR_LEN, 0 };
        if (decode_token(r, &rd, &t) == GC_OK) {
            handle_token(r, now, &t, 1);
            return;
        }
    }
    token_transmit(r, now);
}

/* Someone quarantined asks who hears it: members of an operational ring
   answer (at most every merge_us / 2 each), and nothing else changes.  A
   quarantined member answers too, or two of them would wait for each other. */
static int handle_probe(gc_ring_t *r, uint64_t now, uint32_t sender)
{
    if (r->state != GC_STATE_OPERATIONAL || set_contains(&r->my_memb, sender) ||
        (r->probe_replied_at != 0 && now - r->probe_replied_at < r->cfg.merge_us / 2)) {
        r->stats.drop_ignored++;
        return GC_EIGNORED;
    }
    r->probe_replied_at = now;
    size_t len = encode_probe_reply(r, r->scratch);
    emit_mcast(r, r->scratch, len);
    return GC_OK;
}

/* An answer to our probe: once every member of one ring answered directly
   (we hear them all again) and the back-off is over, merge with it. */
static int handle_probe_reply(gc_ring_t *r, uint64_t now, uint32_t sender, ring_id_t ring, const nodeset_t *memb)
{
    if (!quarantine_holds(r) || ring_id_eq(ring, r->my_ring_id)) {
        r->stats.drop_ignored++;
        return GC_EIGNORED;
    }
    if (!ring_id_eq(ring, r->probe_ring)) {
        r->probe_ring = ring;
        r->probe_memb = *memb;
        r->probe_heard.n = 0;
    }
    set_add(&r->probe_heard, sender);
    if (now >= r->backoff_until && set_subset(&r->probe_memb, &r->probe_heard)) {
        quarantine_end(r);
        return foreign_seen(r, now, sender, ring);
    }
    return GC_OK;
}

static int handle_ring_notice(gc_ring_t *r, uint64_t now, uint32_t type, uint32_t sender, ring_id_t ring)
{
    if (type == MSG_PROBE) return handle_probe(r, now, sender);
    if (type == MSG_MERGE_DETECT) {
        if (ring_id_eq(ring, r->my_ring_id)) { r->stats.drop_ignored++; return GC_EIGNORED; }
        return foreign_seen(r, now, sender, ring);
    }
    /* hold cancel */
    if (!ring_id_eq(ring, r->my_ring_id) || r->state != GC_STATE_OPERATIONAL) {
        r->stats.drop_stale++;
        return GC_ESTALE;
    }
    r->my_seq_unchanged = 0;
    hold_release(r, now, 0);
    return GC_OK;
}

/* ------------------------------------------------------------------ */
/* Dispatch                                                              */
/* ------------------------------------------------------------------ */

static int dispatch(gc_ring_t *r, uint64_t now, const uint8_t *buf, size_t len, int local)
{
    header_t h;
    reader_t rd = { buf, len, 0 };
    int rc = decode_header(r, &rd, &h);
    if (rc != GC_OK) return rc;
    if (h.sender == r->me && !local) { r->stats.drop_self++; return GC_ESELF; }
    switch (h.type) {
    case MSG_TOKEN: {
        token_t t;
        if ((rc = decode_token(r, &rd, &t)) != GC_OK) return rc;
        return handle_token(r, now, &t, 0);
    }
    case MSG_MCAST: {
        mcast_t m;
        if ((rc = decode_mcast(r, &rd, &m)) != GC_OK) return rc;
        return handle_mcast(r, now, h.sender, &m, buf, len);
    }
    case MSG_JOIN: {
        join_t j;
        if ((rc = decode_join(r, &rd, h.sender, &j)) != GC_OK) return rc;
        return handle_join(r, now, h.sender, &j);
    }
    case MSG_COMMIT: {
        commit_t c;
        if ((rc = decode_commit(r, &rd, &c)) != GC_OK) return rc;
        return handle_commit(r, now, &c);
    }
    case MSG_PROBE_REPLY: {
        ring_id_t ring = r_ring_id(&rd);
        nodeset_t memb;
        if (rd.bad || ring.rep == 0 || r_nodeset(&rd, &memb) < 0 || rd.left != 0 ||
            !set_contains(&memb, h.sender))
            return malformed(r, &rd);
        return handle_probe_reply(r, now, h.sender, ring, &memb);
    }
    case MSG_PROBE:
    case MSG_MERGE_DETECT:
    case MSG_HOLD_CANCEL: {
        ring_id_t ring = r_ring_id(&rd);
        if (rd.bad || rd.left != 0 || ring.rep == 0) return malformed(r, &rd);
        return handle_ring_notice(r, now, h.type, h.sender, ring);
    }
    default:
        r->stats.drop_malformed++;
        return GC_EMALFORMED;
    }
}

/* ------------------------------------------------------------------ */
/* Timers                                                                */
/* ------------------------------------------------------------------ */

static void fire(gc_ring_t *r, uint64_t now, int t)
{
    r->deadline[t] = NEVER;
    switch (t) {
    case TIMER_LOOPBACK: {
        uint8_t pkt[CONTROL_BUF_LEN];
        size_t len = r->loop_len;
        memcpy(pkt, r->loop_buf, len);
        dispatch(r, now, pkt, len, 1);
        break;
    }
    case TIMER_TOKEN_LOSS:
        switch (r->state) {
        case GC_STATE_OPERATIONAL:
            r->stats.token_losses++;
            gather_enter(r, now);
            break;
        case GC_STATE_GATHER:
            consensus_expired(r, now);
            break;
        case GC_STATE_COMMIT:
            r->stats.token_losses++;
            if (!round_failed_named(r, now)) gather_enter(r, now);
            break;
        case GC_STATE_RECOVERY:
            r->stats.token_losses++;
            recovery_abort(r);
            gather_enter(r, now);
            break;
        default:
            break;
        }
        break;
    case TIMER_TOKEN_RETRANSMIT:
        if (r->state == GC_STATE_GATHER || r->token_len == 0) break;
        r->stats.tokens_retransmitted++;
        emit_unicast(r, r->token_dest, r->token_buf, r->token_len);
        if (++r->token_retransmits < r->cfg.token_retransmits_max)
            timer_after(r, TIMER_TOKEN_RETRANSMIT, now, r->cfg.token_retransmit_us);
        break;
    case TIMER_HOLD:
        if (r->rep_holding) hold_release(r, now, 0);
        break;
    case TIMER_JOIN:
        if (r->state == GC_STATE_GATHER) {
            send_join(r);
            timer_after(r, TIMER_JOIN, now, r->cfg.join_us);
        }
        break;
    case TIMER_CONSENSUS:
        if (r->state == GC_STATE_GATHER) consensus_expired(r, now);
        break;
    case TIMER_PROBE:
        if (quarantine_holds(r)) {
            size_t len = encode_ring_notice(r, MSG_PROBE, r->scratch);
            emit_mcast(r, r->scratch, len);
            r->probe_heard.n = 0;                /* evidence is what answers this probe */
            r->stats.probes_sent++;
            timer_after(r, TIMER_PROBE, now, r->cfg.merge_us);
        }
        break;
    case TIMER_MERGE_DETECT:
        if (quarantine_holds(r)) {
            timer_after(r, TIMER_MERGE_DETECT, now, r->cfg.merge_us);    /* stay unseen */
            break;
        }
        if (r->state == GC_STATE_OPERATIONAL && r->me == r->my_ring_id.rep &&
            r->my_seq_unchanged > r->cfg.seqno_unchanged_const) {
            size_t len = encode_ring_notice(r, MSG_MERGE_DETECT, r->scratch);
            emit_mcast(r, r->scratch, len);
            r->stats.merge_detects_sent++;
            timer_after(r, TIMER_MERGE_DETECT, now, r->cfg.merge_us);
        }
        break;
    case TIMER_STARTUP:
        consensus_check(r, now);
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------ */
/* Public API                                                            */
/* ------------------------------------------------------------------ */

void gc_ring_config_default(gc_ring_config_t *c)
{
    memset(c, 0, sizeof(*c));
    c->node_id = 1;
    c->cluster_id = 0;
    c->ring_seq_floor = 0;
    c->mtu = 1400;
    c->window_size = 50;
    c->max_messages = 17;
    c->send_queue_max = 10000;
    c->sort_queue_size = 4096;
    c->retransmit_bytes = 32u << 20;
    c->max_members = 32;                 /* a commit token for 32 (828 bytes) fits in 1400 */
    c->token_timeout_us = 1000000;
    c->token_retransmit_us = 238000;     /* token / (4 + 0.2) */
    c->hold_us = 180000;                 /* token_retransmit * 0.8 - 10 ms */
    c->join_us = 50000;
    c->consensus_us = 1200000;           /* 1.2 * token */
    c->merge_us = 200000;
    c->startup_wait_us = 200000;         /* 4 * join: members started together find each other */
    c->fail_recv_const = 2500;
    c->seqno_unchanged_const = 30;
    c->miss_count_const = 5;
    c->token_retransmits_max = 4;
    c->pause_us = 500000;                /* token / 2, as corosync */
    c->exclusion_backoff_us = 1000000;   /* token */
    c->exclusion_backoff_max_us = 4000000; /* 4 * token */
    c->initial_seq = 0;
    c->initial_token_seq = 0;
    c->mutation = 0;
}

int gc_ring_config_check(const gc_ring_config_t *c, const char **errmsg)
{
    const char *msg = NULL;
    if (!c) msg = "config is NULL";
    else if (c->node_id == 0 || c->node_id == UINT32_MAX) msg = "node_id must be in 1..4294967294";
    else if (c->mtu < 256 || c->mtu > MAX_PACKET) msg = "mtu must be in 256..65507";
    else if (c->window_size < 1) msg = "window_size must be >= 1";
    else if (c->max_messages < 1 || c->max_messages > c->window_size) msg = "max_messages must be in 1..window_size";
    else if (c->send_queue_max < 1) msg = "send_queue_max must be >= 1";
    else if (c->sort_queue_size < 64 || c->sort_queue_size > (1u << 24) || (c->sort_queue_size & (c->sort_queue_size - 1)))
        msg = "sort_queue_size must be a power of two in 64..16777216";
    else if (c->sort_queue_size < 4 * c->window_size) msg = "sort_queue_size must be >= 4 * window_size";
    else if (c->retransmit_bytes < c->mtu) msg = "retransmit_bytes must be >= mtu";
    else if (c->max_members < 1 || c->max_members > GC_MAX_MEMBERS) msg = "max_members must be in 1..64";
    else if (COMMIT_LEN(c->max_members) > c->mtu)
        msg = "mtu is too small for a commit token of max_members members (needs 28 + 25 * max_members bytes)";
    else if (c->token_timeout_us == 0 || c->join_us == 0 || c->merge_us == 0) msg = "timeouts must be > 0";
    else if (!(c->token_retransmit_us < c->token_timeout_us)) msg = "token_retransmit must be < token timeout";
    else if (!(c->hold_us < c->token_retransmit_us)) msg = "hold must be < token_retransmit";
    else if (!(c->consensus_us > c->token_timeout_us)) msg = "consensus must be > token timeout";
    else if (!(c->join_us < c->consensus_us)) msg = "join must be < consensus";
    else if (c->hold_us == 0 || c->token_retransmit_us == 0) msg = "hold and token_retransmit must be > 0";
    else if (c->fail_recv_const < 1 || c->seqno_unchanged_const < 1 || c->miss_count_const < 1)
        msg = "fail_recv_const, seqno_unchanged_const and miss_count_const must be >= 1";
    else if (c->token_retransmits_max < 1) msg = "token_retransmits_max must be >= 1";
    else if (c->pause_us == 0) msg = "pause (pause_fraction * token timeout) must be > 0";
    else if (c->exclusion_backoff_us > c->exclusion_backoff_max_us)
        msg = "exclusion_backoff must be <= exclusion_backoff_max";
    else if (c->ring_seq_floor > JOIN_RING_SEQ_MAX) msg = "ring_seq_floor is too large (max 2**62 - 4)";
    if (errmsg) *errmsg = msg;
    return msg ? GC_EINVAL : GC_OK;
}

int gc_ring_new(const gc_ring_config_t *cfg, gc_ring_t **out)
{
    if (!out) return GC_EINVAL;
    *out = NULL;
    if (gc_ring_config_check(cfg, NULL) != GC_OK) return GC_EINVAL;
    gc_ring_t *r = calloc(1, sizeof(*r));
    if (!r) return GC_ENOMEM;
    r->cfg = *cfg;
    r->me = cfg->node_id;
    r->buf_cap = cfg->mtu;
    uint64_t keep = cfg->retransmit_bytes / cfg->mtu;
    if (keep < 2u * (uint64_t)cfg->window_size) keep = 2u * (uint64_t)cfg->window_size;
    r->keep_max = keep < cfg->sort_queue_size ? (uint32_t)keep : cfg->sort_queue_size;
    r->max_payload = cfg->mtu - 2 * MCAST_HDR_LEN - ENTRY_HDR_LEN;
    r->rtr_cap = (cfg->mtu - TOKEN_BASE_LEN) / 4u;
    if (r->rtr_cap > GC_RTR_MAX) r->rtr_cap = GC_RTR_MAX;
    r->pool = calloc(BUF_POOL_MAX, sizeof(uint8_t *));
    r->retrans = calloc(cfg->sort_queue_size, sizeof(uint32_t));
    if (!r->pool || !r->retrans || sq_init(&r->regular, cfg->sort_queue_size) < 0 ||
        sq_init(&r->recovery, cfg->sort_queue_size) < 0) {
        gc_ring_free(r);
        return GC_ENOMEM;
    }
    for (int i = 0; i < TIMER_COUNT; i++) r->deadline[i] = NEVER;
    r->state = GC_STATE_INIT;
    r->ring_seq_max = cfg->ring_seq_floor;
    r->my_ring_id.rep = r->me;
    r->my_ring_id.seq = cfg->ring_seq_floor;
    r->my_old_ring_id = r->my_ring_id;
    r->start_seq = cfg->initial_seq;
    r->my_aru = r->my_high_seq_received = r->my_high_delivered = cfg->initial_seq;
    r->my_last_aru = r->my_safe_upto = cfg->initial_seq;
    r->regular.low = r->recovery.low = cfg->initial_seq + 1;
    r->taken = 1;
    *out = r;
    return GC_OK;
}

void gc_ring_free(gc_ring_t *r)
{
    if (!r) return;
    sortq_t *qs[2] = { &r->regular, &r->recovery };
    for (int k = 0; k < 2; k++) {
        if (!qs[k]->slots) continue;
        for (uint32_t i = 0; i < qs[k]->size; i++) free(qs[k]->slots[i].buf);
        free(qs[k]->slots);
    }
    if (r->pool)
        for (size_t i = 0; i < r->pool_n; i++) free(r->pool[i]);
    free(r->pool);
    free(r->retrans);
    free(r->appq.data);
    free(r->actions);
    free(r->out);
    free(r);
}

static int running(const gc_ring_t *r)
{
    return r->state != GC_STATE_INIT && r->state != GC_STATE_LEFT;
}

static int finish(gc_ring_t *r, int rc)
{
    if (r->oom) { r->oom = 0; return GC_ENOMEM; }
    return rc;
}

int gc_ring_start(gc_ring_t *r, uint64_t now)
{
    if (!r || r->state != GC_STATE_INIT) return GC_EINVAL;
    outputs_begin(r);
    r->startup_until = now + r->cfg.startup_wait_us;
    set_single(&r->my_proc, r->me);
    gather_enter(r, now);
    return finish(r, GC_OK);
}

int gc_ring_receive(gc_ring_t *r, uint64_t now, const uint8_t *buf, size_t len)
{
    if (!r || (!buf && len)) return GC_EINVAL;
    if (!running(r)) return GC_ENOTRUNNING;
    outputs_begin(r);
    pause_check(r, now);
    r->stats.packets_received++;
    r->stats.bytes_received += len;
    if (len > MAX_PACKET) { r->stats.drop_malformed++; return GC_EMALFORMED; }
    return finish(r, dispatch(r, now, buf, len, 0));
}

int gc_ring_submit(gc_ring_t *r, uint64_t now, const uint8_t *payload, size_t len, int flags)
{
    if (!r || (!payload && len) || flags < 0 || flags > 0xFF) return GC_EINVAL;
    if (!running(r)) return GC_ENOTRUNNING;
    if (len > r->max_payload) return GC_ETOOBIG;
    if (r->appq.count >= r->cfg.send_queue_max) return GC_EQUEUEFULL;
    outputs_begin(r);
    pause_check(r, now);
    if (appq_push(&r->appq, payload, len, (unsigned)flags) < 0) return GC_ENOMEM;
    r->stats.messages_sent++;
    if (r->state == GC_STATE_OPERATIONAL) {
        if (r->rep_holding) {
            r->my_seq_unchanged = 0;
            hold_release(r, now, 1);
        } else if (r->my_token_held) {
            size_t n = encode_ring_notice(r, MSG_HOLD_CANCEL, r->scratch);
            emit_mcast(r, r->scratch, n);
            r->my_token_held = 0;
        }
    }
    return finish(r, r->n_actions > 0 ? GC_OUTPUT : GC_OK);
}

int gc_ring_tick(gc_ring_t *r, uint64_t now)
{
    if (!r) return GC_EINVAL;
    if (!running(r)) return GC_OK;
    outputs_begin(r);
    pause_check(r, now);
    /* A token we passed to ourselves (a ring of one) is processed once per
       call: it comes back at once, so without this one call would order up
       to TICK_FIRE_MAX visits' worth of the send queue (tens of MB at a large
       mtu) in one step.  One visit per call bounds a step like a token visit
       does in a bigger ring (max_messages); the caller ticks again at once. */
    int looped = 0;
    for (int n = 0; n < TICK_FIRE_MAX; n++) {
        int next = -1;
        for (int t = 0; t < TIMER_COUNT; t++)
            if (r->deadline[t] <= now && !(t == TIMER_LOOPBACK && looped) &&
                (next < 0 || r->deadline[t] < r->deadline[next]))
                next = t;
        if (next < 0) break;
        if (next == TIMER_LOOPBACK) looped = 1;
        fire(r, now, next);
    }
    return finish(r, GC_OK);
}

int gc_ring_leave(gc_ring_t *r, uint64_t now)
{
    if (!r) return GC_EINVAL;
    if (!running(r)) return GC_ENOTRUNNING;
    outputs_begin(r);
    nodeset_t proc = r->my_proc, fail = r->my_fail;
    set_remove(&proc, r->me);
    set_add(&fail, r->me);
    size_t len = encode_join(r, JOIN_FLAG_LEAVE, &proc, &fail, r->scratch);
    emit_mcast(r, r->scratch, len);     /* twice: leave is best effort over lossy links */
    emit_mcast(r, r->scratch, len);
    r->state = GC_STATE_LEFT;
    for (int i = 0; i < TIMER_COUNT; i++) r->deadline[i] = NEVER;
    (void)now;
    return finish(r, GC_OK);
}

int gc_ring_suspect(gc_ring_t *r, uint64_t now, uint32_t node)
{
    if (!r) return GC_EINVAL;
    if (!running(r)) return GC_ENOTRUNNING;
    const nodeset_t *members = (r->state == GC_STATE_COMMIT || r->state == GC_STATE_RECOVERY)
                                   ? &r->my_new_memb
                                   : (r->state == GC_STATE_OPERATIONAL ? &r->my_memb : &r->my_proc);
    if (node == r->me || !set_contains(members, node) || set_contains(&r->my_fail, node)) return GC_EIGNORED;
    outputs_begin(r);
    r->stats.suspicions++;
    set_add(&r->my_proc, node);
    set_add(&r->my_fail, node);
    if (r->state == GC_STATE_RECOVERY) recovery_abort(r);
    gather_enter(r, now);
    return finish(r, GC_OK);
}

uint64_t gc_ring_next_deadline(const gc_ring_t *r)
{
    if (!r || !running(r)) return NEVER;
    return earliest_deadline(r);
}

size_t gc_ring_output_count(const gc_ring_t *r)
{
    return (r && !r->taken) ? r->n_actions : 0;
}

int gc_ring_take(gc_ring_t *r, const gc_action_t **actions, size_t *n_actions,
                 const uint8_t **data, size_t *data_len)
{
    if (!r || !actions || !n_actions || !data || !data_len) return GC_EINVAL;
    if (r->taken) {
        *actions = NULL; *n_actions = 0; *data = NULL; *data_len = 0;
        return GC_OK;
    }
    *actions = r->actions;
    *n_actions = r->n_actions;
    *data = r->out;
    *data_len = r->out_len;
    r->taken = 1;
    return GC_OK;
}

int gc_ring_state(const gc_ring_t *r) { return r ? r->state : GC_STATE_INIT; }
uint64_t gc_ring_ring_seq(const gc_ring_t *r) { return r ? r->ring_seq_max : 0; }
uint32_t gc_ring_ring_rep(const gc_ring_t *r) { return r ? r->my_ring_id.rep : 0; }
size_t gc_ring_max_payload(const gc_ring_t *r) { return r ? r->max_payload : 0; }
size_t gc_ring_pending(const gc_ring_t *r) { return r ? r->appq.count : 0; }

size_t gc_ring_members(const gc_ring_t *r, uint32_t *out, size_t cap)
{
    if (!r) return 0;
    size_t n = r->my_memb.n;
    for (size_t i = 0; i < n && i < cap; i++) out[i] = r->my_memb.id[i];
    return n;
}

void gc_ring_get_stats(const gc_ring_t *r, gc_ring_stats_t *out)
{
    if (r && out) *out = r->stats;
}

static size_t debug_set(char *buf, size_t cap, size_t at, const char *name, const nodeset_t *s)
{
    if (at < cap) at += (size_t)snprintf(buf + at, cap - at, " %s={", name);
    for (uint32_t i = 0; i < s->n && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, i ? ",%u" : "%u", s->id[i]);
    if (at < cap) at += (size_t)snprintf(buf + at, cap - at, "}");
    return at;
}

size_t gc_ring_debug(const gc_ring_t *r, char *buf, size_t cap)
{
    if (!r || !buf || cap == 0) return 0;
    size_t at = (size_t)snprintf(buf, cap,
        "node=%u state=%s ring=%u:%llu old=%u:%llu seqmax=%llu aru=%u high=%u delivered=%u "
        "old_aru=%u old_high=%u retrans=%zu/%zu pending=%zu",
        r->me, gc_state_name(r->state), r->my_ring_id.rep, (unsigned long long)r->my_ring_id.seq,
        r->my_old_ring_id.rep, (unsigned long long)r->my_old_ring_id.seq,
        (unsigned long long)r->ring_seq_max, r->my_aru, r->my_high_seq_received, r->my_high_delivered,
        r->old_aru, r->old_high, r->retrans_head, r->retrans_n, r->appq.count);
    at = debug_set(buf, cap, at, "memb", &r->my_memb);
    at = debug_set(buf, cap, at, "new", &r->my_new_memb);
    at = debug_set(buf, cap, at, "proc", &r->my_proc);
    at = debug_set(buf, cap, at, "fail", &r->my_fail);
    at = debug_set(buf, cap, at, "consensus", &r->my_consensus);
    for (int t = 0; t < TIMER_COUNT && at < cap; t++)
        if (r->deadline[t] != NEVER)
            at += (size_t)snprintf(buf + at, cap - at, " t%d=%llu", t, (unsigned long long)r->deadline[t]);
    return at < cap ? at : cap - 1;
}

const char *gc_strerror(int code)
{
    switch (code) {
    case GC_OK: return "ok";
    case GC_EINVAL: return "invalid argument or configuration";
    case GC_ETOOBIG: return "payload larger than the ring's maximum message size";
    case GC_EQUEUEFULL: return "send queue full";
    case GC_ENOTRUNNING: return "ring not running (not started, or left)";
    case GC_ENOMEM: return "out of memory";
    case GC_ETRUNCATED: return "packet truncated";
    case GC_EBADMAGIC: return "not a groupcomm ring packet";
    case GC_EBADVERSION: return "unsupported wire version";
    case GC_EFOREIGN: return "packet from another cluster";
    case GC_EMALFORMED: return "malformed packet";
    case GC_ESTALE: return "stale, foreign-ring or duplicate packet";
    case GC_ESELF: return "our own packet looped back";
    case GC_EIGNORED: return "packet not applicable in this state";
    default: return "unknown error";
    }
}

const char *gc_state_name(int state)
{
    static const char *names[] = { "INIT", "GATHER", "COMMIT", "RECOVERY", "OPERATIONAL", "LEFT" };
    return (state >= 0 && state <= GC_STATE_LEFT) ? names[state] : "?";
}

/* The membership state machine, for the docs' diagram.  Keep in sync with the
   handlers above: each row is a (state, input) pair the code acts on. */
static const char *const transitions[][3] = {
    { "INIT", "start", "GATHER" },
    { "GATHER", "join with equal sets, consensus, lowest id", "COMMIT (create commit token)" },
    { "GATHER", "join with new information", "GATHER (restart)" },
    { "GATHER", "foreign message / merge detect from new node", "GATHER (restart)" },
    { "GATHER", "consensus timeout", "GATHER (fail silent members)" },
    { "GATHER", "commit token for our (proc - fail)", "COMMIT" },
    { "COMMIT", "commit token, second pass", "RECOVERY" },
    { "COMMIT", "token loss", "GATHER" },
    { "COMMIT", "join from a new member, newer ring seq", "GATHER" },
    { "RECOVERY", "regular token, recovery complete", "OPERATIONAL (EVS delivery)" },
    { "RECOVERY", "token loss", "GATHER (restore old ring)" },
    { "RECOVERY", "join from a new member, newer ring seq", "GATHER (restore old ring)" },
    { "OPERATIONAL", "token loss", "GATHER" },
    { "OPERATIONAL", "join (not stale, not excluding us)", "GATHER" },
    { "OPERATIONAL", "foreign message / merge detect", "GATHER" },
    { "OPERATIONAL", "failed to receive", "GATHER (self-exclusion) -> singleton, quarantined" },
    { "OPERATIONAL", "quarantined: probe answered by every member of a ring", "GATHER (merge)" },
    { "GATHER", "consensus timeout, a wanted member failed us (2nd such round)", "GATHER (self-exclusion) -> singleton, quarantined" },
    { "COMMIT", "token loss, a wanted member failed us (2nd such round)", "GATHER (self-exclusion) -> singleton, quarantined" },
    { "any", "leave", "LEFT" },
};

size_t gc_ring_transition_count(void) { return sizeof(transitions) / sizeof(transitions[0]); }

int gc_ring_transition(size_t i, const char **state, const char **input, const char **action)
{
    if (i >= gc_ring_transition_count() || !state || !input || !action) return GC_EINVAL;
    *state = transitions[i][0];
    *input = transitions[i][1];
    *action = transitions[i][2];
    return GC_OK;
}
