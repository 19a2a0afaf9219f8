/*
 * groupcomm/_ring.h -- public C API of the sans-IO Totem single-ring core.
 *
 * The block between CDEF-BEGIN and CDEF-END is fed verbatim to cffi's cdef
 * (groupcomm/_ring_build.py), so the compiler and the binding see the same
 * declarations.  Keep preprocessor directives outside that block.
 *
 * Contract with the driver (Python):
 *   - Every input call takes `now` in microseconds of a monotonic clock the
 *     driver owns; the core never reads a clock and never does I/O.
 *   - After each input call the driver calls gc_ring_take() and performs the
 *     actions in order: SEND_MCAST / SEND_UNICAST packets go to the network,
 *     DELIVER and CONFCHG go to the application.  The order of DELIVER and
 *     CONFCHG actions is the EVS delivery order and must be preserved.
 *   - Buffers returned by gc_ring_take() stay valid until the next call that
 *     takes `now`; copy them before that.
 *   - The driver calls gc_ring_tick() no later than gc_ring_next_deadline().
 *     A call much later than that (pause_us) is taken as a pause of this
 *     process (SIGSTOP, a GC, a VM stall), not as silence of the others.
 */
#ifndef GROUPCOMM_RING_H
#define GROUPCOMM_RING_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
enum { GC_WIRE_VERSION = 2 };    /* the third byte of every datagram of ours (groupcomm.layers.wire.PROTOCOL_VERSION) */

enum gc_err {
    GC_OK = 0,
    GC_OUTPUT = 1,           /* gc_ring_submit: queued, and there are outputs to take */
    /* local misuse (LocalProtocolError) */
    GC_EINVAL = -1,          /* bad argument or configuration value */
    GC_ETOOBIG = -2,         /* payload larger than gc_ring_max_payload() */
    GC_EQUEUEFULL = -3,      /* send queue full; retry after the ring drains it */
    GC_ENOTRUNNING = -4,     /* not started, or left */
    GC_ENOMEM = -5,
    /* remote misbehaviour: the packet was dropped and counted */
    GC_ETRUNCATED = -20,     /* shorter than its header or its declared contents */
    GC_EBADMAGIC = -21,      /* not a groupcomm ring packet */
    GC_EBADVERSION = -22,    /* unknown wire version */
    GC_EFOREIGN = -23,       /* another cluster (cluster id differs) */
    GC_EMALFORMED = -24,     /* a field is out of range or inconsistent */
    GC_ESTALE = -25,         /* from an old or other ring, or a duplicate */
    GC_ESELF = -26,          /* our own packet looped back */
    GC_EIGNORED = -27        /* valid, but not acted upon in this state */
};

enum gc_action_kind {
    GC_ACT_SEND_MCAST = 1,   /* data: a packet for every member */
    GC_ACT_SEND_UNICAST = 2, /* node: destination; data: a packet */
    GC_ACT_DELIVER = 3,      /* node: sender; flags: as submitted (bit0 safe, bits 1-7 kind); value: ring seq */
    GC_ACT_CONFCHG = 4       /* node: ring rep; value: ring seq; flags bit0: transitional;
                                count: members; data: count little-endian uint32 node ids */
};

enum gc_state {
    GC_STATE_INIT = 0,
    GC_STATE_GATHER = 1,
    GC_STATE_COMMIT = 2,
    GC_STATE_RECOVERY = 3,
    GC_STATE_OPERATIONAL = 4,
    GC_STATE_LEFT = 5
};

typedef struct {
    uint8_t kind;
    uint8_t flags;
    uint16_t count;
    uint32_t node;
    uint64_t value;
    uint32_t offset;   /* into the data buffer of gc_ring_take() */
    uint32_t len;
} gc_action_t;

typedef struct {
    uint32_t node_id;              /* this member, 1..0xfffffffe */
    uint32_t cluster_id;           /* packets of other clusters are dropped */
    uint64_t ring_seq_floor;       /* ring ids this incarnation creates are > this (<= 2^62 - 4);
                                      restart with (highest ring seq ever used) + 1 */
    uint32_t mtu;                  /* largest datagram the ring sends (bytes) */
    uint32_t window_size;          /* messages per token rotation, all members */
    uint32_t max_messages;         /* messages per token visit, one member */
    uint32_t send_queue_max;       /* application messages waiting to be sent */
    uint32_t sort_queue_size;      /* in-flight window of sequence numbers (power of 2) */
    uint64_t retransmit_bytes;     /* ring messages kept for retransmission, in bytes (each kept
                                      message takes mtu bytes); at least 2 * window_size of them */
    uint32_t max_members;          /* ring size limit (<= GC_MAX_MEMBERS) */
    uint64_t token_timeout_us;     /* token loss -> membership round */
    uint64_t token_retransmit_us;  /* re-send our last token while it may be lost */
    uint64_t hold_us;              /* idle ring: representative parks the token this long */
    uint64_t join_us;              /* join re-send period while gathering */
    uint64_t consensus_us;         /* gather gives up on silent members after this */
    uint64_t merge_us;             /* idle representative announces its ring this often */
    uint64_t startup_wait_us;      /* a fresh member gathers this long before its first ring */
    uint32_t fail_recv_const;      /* rotations with a stuck aru (and 2 token timeouts) before self-exclusion */
    uint32_t seqno_unchanged_const;/* idle rotations before the token is held */
    uint32_t miss_count_const;     /* visits a hole must persist before it is requested */
    uint32_t token_retransmits_max;/* re-sends of one token before waiting for loss */
    uint64_t pause_us;             /* a call this late past our deadline: we were paused */
    uint64_t exclusion_backoff_us; /* after excluding ourselves, stay out at least this long ... */
    uint64_t exclusion_backoff_max_us; /* ... doubled per exclusion in a row, up to this */
    uint32_t initial_seq;          /* test knob: first message seq of each ring - 1 */
    uint32_t initial_token_seq;    /* test knob: token seq of each new ring */
    uint32_t mutation;             /* test knob: deliberate bug for checker tests (0 = none) */
} gc_ring_config_t;

typedef struct {
    uint64_t packets_received;
    uint64_t packets_sent;
    uint64_t bytes_received;
    uint64_t bytes_sent;
    uint64_t drop_truncated;
    uint64_t drop_bad_magic;
    uint64_t drop_bad_version;
    uint64_t drop_foreign_cluster;
    uint64_t drop_malformed;
    uint64_t drop_stale;
    uint64_t drop_self;
    uint64_t drop_ignored;
    uint64_t drop_out_of_window;
    uint64_t drop_duplicate;
    uint64_t messages_sent;        /* application messages submitted to the ring */
    uint64_t messages_delivered;   /* application messages delivered */
    uint64_t datagrams_originated; /* ring messages (packed datagrams) we stamped */
    uint64_t retransmissions;      /* ring messages we re-sent on request */
    uint64_t retransmit_requests;  /* holes we asked for */
    uint64_t tokens_received;      /* accepted regular tokens */
    uint64_t tokens_retransmitted;
    uint64_t token_holds;          /* times the idle representative parked the token */
    uint64_t gather_entered;
    uint64_t commit_entered;
    uint64_t recovery_entered;
    uint64_t operational_entered;
    uint64_t consensus_timeouts;
    uint64_t token_losses;
    uint64_t merge_detects_sent;
    uint64_t failed_to_receive;    /* times we excluded ourselves (stuck aru) */
    uint64_t suspicions;           /* members excluded on the failure detector's word */
    uint64_t continuous_gathers;   /* current run of consensus timeouts without a ring */
    uint64_t pauses_detected;      /* times we were called pause_us or more past our deadline */
    uint64_t backoffs;             /* times we quarantined our singleton after excluding ourselves */
    uint64_t probes_sent;          /* quarantined: probes asking who hears us */
    uint64_t excluded_by_peers;    /* times we left because others failed us and our round failed */
} gc_ring_stats_t;

typedef struct gc_ring gc_ring_t;

void gc_ring_config_default(gc_ring_config_t *cfg);
/* Validates cfg; on error returns GC_EINVAL and, if errmsg != NULL, a static
   description of the first bad field. */
int gc_ring_config_check(const gc_ring_config_t *cfg, const char **errmsg);
int gc_ring_new(const gc_ring_config_t *cfg, gc_ring_t **out);
void gc_ring_free(gc_ring_t *r);

int gc_ring_start(gc_ring_t *r, uint64_t now);
int gc_ring_receive(gc_ring_t *r, uint64_t now, const uint8_t *buf, size_t len);
/* flags: bit0 safe delivery; bits 1-7 an opaque kind for the layers above, delivered back as is.
 * Returns GC_OK, or GC_OUTPUT when outputs are waiting for gc_ring_take (saves a call). */
int gc_ring_submit(gc_ring_t *r, uint64_t now, const uint8_t *payload, size_t len, int flags);
int gc_ring_tick(gc_ring_t *r, uint64_t now);
int gc_ring_leave(gc_ring_t *r, uint64_t now);
/* A failure detector verified that `node` is dead: exclude it now rather than
   after token loss + consensus.  Ignored (GC_EIGNORED) for non-members. */
int gc_ring_suspect(gc_ring_t *r, uint64_t now, uint32_t node);

uint64_t gc_ring_next_deadline(const gc_ring_t *r);   /* UINT64_MAX: nothing scheduled */
size_t gc_ring_output_count(const gc_ring_t *r);      /* actions waiting for gc_ring_take() */
int gc_ring_take(gc_ring_t *r, const gc_action_t **actions, size_t *n_actions,
                 const uint8_t **data, size_t *data_len);

int gc_ring_state(const gc_ring_t *r);
uint64_t gc_ring_ring_seq(const gc_ring_t *r);        /* highest ring seq seen/used */
uint32_t gc_ring_ring_rep(const gc_ring_t *r);
size_t gc_ring_max_payload(const gc_ring_t *r);
size_t gc_ring_pending(const gc_ring_t *r);           /* messages queued, not yet ordered */
size_t gc_ring_members(const gc_ring_t *r, uint32_t *out, size_t cap);
void gc_ring_get_stats(const gc_ring_t *r, gc_ring_stats_t *out);
/* A one-line human-readable dump of the membership state, for debugging. */
size_t gc_ring_debug(const gc_ring_t *r, char *buf, size_t cap);
const char *gc_strerror(int code);
const char *gc_state_name(int state);
/* The membership transition table, for docs: rows of (state, message type, action). */
size_t gc_ring_transition_count(void);
int gc_ring_transition(size_t i, const char **state, const char **input, const char **action);

#define GC_MAX_MEMBERS 64
#define GC_RTR_MAX 64
/* CDEF-END */

#endif /* GROUPCOMM_RING_H */
