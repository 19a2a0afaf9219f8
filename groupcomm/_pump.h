/*
 * groupcomm/_pump.h -- the C socket pump: one POSIX thread that drives a
 * gc_ring_t over UDP sockets, so a token hop costs no Python wake-up.
 *
 * The ring stays sans-IO; the pump is its driver (what channel.py does in
 * Python), moved into C.  The block between CDEF-BEGIN and CDEF-END is fed to
 * cffi after the one of _ring.h (groupcomm/_ring_build.py).
 *
 * Contract with Python (groupcomm/pump.py):
 *   - The ring is not thread-safe.  While the pump runs, every ring call made
 *     from Python happens between gc_pump_lock() and gc_pump_unlock(), with
 *     `now` from gc_pump_now_us().  gc_pump_unlock() first sends the ring's
 *     packets and queues its deliveries.  Nobody else calls gc_ring_take().
 *   - gc_pump_submit() is the exception: it never waits for the thread.  When
 *     the lock is taken it queues the message (in order) for whoever holds
 *     the lock, who submits it before letting go.  Messages queued so count
 *     in gc_pump_pending(), so GC_EQUEUEFULL still comes at once.
 *   - Deliveries, configuration changes (gc_ring_take()'s record format) and
 *     the other layers' datagrams (magic "G" + anything but "C": failure
 *     detector "GF", unicast "GU", probe "GP") come out of gc_pump_take(),
 *     without taking the lock; its buffers stay valid until the next
 *     gc_pump_take().  Other datagrams go to the ring, which counts them.
 *     One take hands over every datagram waiting but at most take_max
 *     deliveries and take_max_bytes of their data (whole runs, at least
 *     one), so one take is a bounded amount of work for Python; the rest
 *     waits, in order, for the next take.
 *   - With cfg.seal, every datagram is opened before anything looks at it
 *     (those that do not open are dropped) and sealed as it is queued.
 *   - A peer's address is learnt only from a ring packet the ring accepted,
 *     or from Python (gc_pump_learn) for the other layers' datagrams.
 *   - gc_pump_notify_fd() becomes readable when that output goes from empty
 *     to non-empty, and again after a take that left some.  Read it (an
 *     eventfd) before taking, never after.
 */
#ifndef GROUPCOMM_PUMP_H
#define GROUPCOMM_PUMP_H

#include "_ring.h"
#include "_seal.h"

/* CDEF-BEGIN */
typedef struct {
    int unicast_fd;              /* bound, non-blocking; every packet leaves through it */
    int multicast_fd;            /* joined to the group, non-blocking; -1: unicast-only */
    uint32_t node_id;            /* our own packets looped back are dropped */
    uint32_t cluster_id;         /* peers are learned only from packets of this cluster */
    uint32_t send_queue_max;     /* the ring's send_queue_max: the room gc_pump_submit() checks */
    uint32_t slot_size;          /* receive slot in bytes; longer datagrams are dropped and counted */
    uint32_t batch;              /* datagrams per recvmmsg call */
    uint32_t max_backlog;        /* deliveries waiting for Python before the pump stops reading */
    uint64_t max_backlog_bytes;  /* ... or their bytes */
    gc_seal_t *seal;             /* the cluster key (must outlive the pump); NULL: datagrams in clear */
    uint32_t take_max;           /* deliveries one gc_pump_take() hands over at most ... */
    uint64_t take_max_bytes;     /* ... and their bytes (at least one run of deliveries) */
} gc_pump_config_t;

typedef struct {
    uint32_t offset;             /* into the packet data of gc_pump_take() */
    uint32_t len;
    uint16_t family;             /* AF_INET or AF_INET6 */
    uint16_t port;               /* host byte order */
    uint32_t scope_id;
    uint8_t addr[16];            /* the first 4 bytes for AF_INET */
    uint32_t newest;             /* the newest datagram yet from its sender (always 1 without a key) */
} gc_pump_packet_t;

typedef struct {
    const gc_action_t *actions;  /* deliveries and configuration changes, in order */
    size_t n_actions;
    const uint8_t *data;         /* their data, as gc_ring_take() gives it */
    size_t data_len;
    const gc_pump_packet_t *packets;  /* the other layers' datagrams, in arrival order */
    size_t n_packets;
    const uint8_t *packet_data;
    size_t packet_data_len;
} gc_pump_batch_t;

typedef struct {
    uint64_t wakeups;            /* thread wake-ups (socket, timer or kick) */
    uint64_t batches;            /* recvmmsg calls that returned datagrams */
    uint64_t datagrams;          /* datagrams received */
    uint64_t drops;              /* datagrams longer than a receive slot, dropped */
    uint64_t self_drops;         /* our own packets looped back */
    uint64_t to_python;          /* datagrams queued for Python (FD, unicast, probe) */
    uint64_t python_drops;       /* ... dropped because Python's queue was full */
    uint64_t ticks;              /* timer ticks of the ring */
    uint64_t sends;              /* datagrams sent */
    uint64_t send_errors;        /* sends that failed (EAGAIN, unreachable): the ring retransmits */
    uint64_t unknown_dest;       /* unicasts to a member whose address we have not learned */
    uint64_t notifies;           /* times Python was woken */
    uint64_t kicks;              /* times Python's input moved a timer earlier and woke the thread */
    uint64_t handoffs;           /* messages queued because the lock was taken */
    uint64_t submit_drops;       /* queued messages the ring refused (it had left, or no memory) */
    uint64_t pauses;             /* times reading stopped because Python fell behind */
    uint64_t seal_drops;         /* datagrams that did not open under the key (the seal counts why) */
    uint64_t seal_errors;        /* datagrams we could not seal (local: out of memory), not sent */
    uint64_t takes_cut;          /* takes that left deliveries for the next one (take_max) */
} gc_pump_stats_t;

typedef struct gc_pump gc_pump_t;

/* What a driver does with a datagram (opened, if the cluster has a key).  Both drivers
   (this pump and the trio one, groupcomm/io/channel.py) sort datagrams with this one
   function, in this order of rules:
     PROBE   "GP": a `groupcomm probe` request; Python answers it;
     SELF    our own node id as sender (bytes 8..11): our multicast looped back, dropped;
     MEMBER  "G" + anything but "C" (failure detector, unicast), or a ring packet of
             another wire version: Python's Member.receive (it counts and logs those);
     TOKEN   a ring token: handed to the ring after the messages of the same read;
     RING    anything else: the ring, which validates it. */
enum { GC_DGRAM_PROBE = 0, GC_DGRAM_SELF = 1, GC_DGRAM_MEMBER = 2, GC_DGRAM_TOKEN = 3, GC_DGRAM_RING = 4 };
int gc_pump_classify(const uint8_t *buf, size_t len, uint32_t node_id);

/* CLOCK_MONOTONIC in microseconds: the clock of every ring input while the pump runs. */
uint64_t gc_pump_now_us(void);

/* The ring must outlive the pump; the sockets must stay open until gc_pump_stop(). */
int gc_pump_new(gc_ring_t *ring, const gc_pump_config_t *cfg, gc_pump_t **out);
/* Stops the thread if it runs, then frees; the sockets are not closed. */
void gc_pump_free(gc_pump_t *p);
/* Where "send to all" goes: the multicast group ... */
int gc_pump_set_group(gc_pump_t *p, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id);
/* ... or, without a group, every target (static hosts, discovery, every source we hear). */
int gc_pump_add_target(gc_pump_t *p, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id);

int gc_pump_start(gc_pump_t *p);   /* creates the thread */
int gc_pump_stop(gc_pump_t *p);    /* wakes it and joins it */
int gc_pump_notify_fd(const gc_pump_t *p);

void gc_pump_lock(gc_pump_t *p);
/* Sends and queues what the ring produced, then unlocks; GC_ENOMEM if a delivery was lost. */
int gc_pump_unlock(gc_pump_t *p);
/* gc_ring_submit's checks and results (GC_OK, GC_ETOOBIG, GC_EQUEUEFULL, ...),
   without waiting for the lock; see the contract above. */
int gc_pump_submit(gc_pump_t *p, const uint8_t *payload, size_t len, int flags);
/* gc_pump_submit for n messages (message i is lens[i] bytes of `data`, after those before
   it), in order, in one call: stops at the first one refused (GC_EQUEUEFULL, GC_ETOOBIG,
   ...) and returns its error; *taken says how many went in (all of them: GC_OK). */
int gc_pump_submit_many(gc_pump_t *p, const uint8_t *data, const uint32_t *lens, size_t n, int flags,
                        size_t *taken);
/* The ring's pending messages as of the last locked call, plus those queued by gc_pump_submit. */
size_t gc_pump_pending(const gc_pump_t *p);
/* The ring's gc_ring_ring_seq() as of the last locked call, without the lock; it is
   published before that call's deliveries are queued, so it is never older than them. */
uint64_t gc_pump_ring_seq(const gc_pump_t *p);

int gc_pump_take(gc_pump_t *p, gc_pump_batch_t *out);

/* Packets of the layers above the ring (failure detector), sent like the ring's. */
int gc_pump_send_all(gc_pump_t *p, const uint8_t *buf, size_t len);
int gc_pump_send_to(gc_pump_t *p, uint32_t node, const uint8_t *buf, size_t len);

/* Where `node` is: an address the layer above accepted a datagram from (the pump itself
   learns only from ring packets the ring accepted). */
int gc_pump_learn(gc_pump_t *p, uint32_t node, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id);

/* At a view: forget the peers outside `members` (n node ids) last heard before `silent_since`
   (gc_pump_now_us time; UINT64_MAX: every one outside), and the unicast-only targets learnt
   from peers no longer known (those of gc_pump_add_target stay).  Returns the peers kept. */
size_t gc_pump_forget(gc_pump_t *p, const uint32_t *members, size_t n, uint64_t silent_since);

/* When each known peer was last heard from (gc_pump_now_us() time); returns the count. */
size_t gc_pump_heard(gc_pump_t *p, uint32_t *nodes, uint64_t *times, size_t cap);
void gc_pump_get_stats(gc_pump_t *p, gc_pump_stats_t *out);

#define GC_PUMP_PEERS_MAX 256   /* node id -> address entries; the stalest is replaced */
/* CDEF-END */

#endif /* GROUPCOMM_PUMP_H */
