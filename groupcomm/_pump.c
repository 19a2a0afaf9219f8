/*
 * groupcomm/_pump.c -- the C socket pump (see _pump.h for the contract).
 *
 * One thread per channel: epoll over the ring's sockets and a wake-up
 * eventfd; readable datagrams are drained with recvmmsg in rounds (a batch
 * of each socket, then the round's tokens and due timers, the lock released
 * between steps), ring packets go to gc_ring_receive (regular messages before
 * the tokens that follow them, as channel.py's _drain does), the other layers' packets (magic "G?" but
 * not "GC": failure detector, unicast, probe) are queued for Python; the ring's packets go out with sendmmsg; deliveries are queued
 * for Python, which is woken through a second eventfd.  The thread ticks the
 * ring at gc_ring_next_deadline() on CLOCK_MONOTONIC.
 *
 * One mutex guards the ring and the pump's own state.  Python never waits
 * for it on the hot paths: its output arrives on a lock-free list of chunks
 * (gc_pump_take swaps the whole list out), and a submit that finds the lock
 * taken goes onto a lock-free inbox that the lock holder drains before it
 * lets go (the check after unlocking closes the race).  Syscalls that wait
 * (epoll_wait, recvmmsg) happen outside the lock.
 */
#define _GNU_SOURCE
#include "_pump.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TARGETS_MAX 256          /* unicast-only "send to all" destinations */
#define SEND_BATCH 64            /* datagrams per sendmmsg call */
#define TOKEN_STASH 4            /* tokens held back until the wake-up's messages are in */
#define DRAIN_ROUNDS_MAX 16      /* rounds (a batch per socket, then tokens and timers) per wake-up */
#define PACKETS_MAX 4096         /* FD/probe datagrams waiting for Python */
#define EVENTS_MAX 4
#define NEVER UINT64_MAX

#define HDR_LEN 12               /* magic, version, type, cluster id, sender id */
#define SEALED_SLOT (65536 + GC_SEAL_OVERHEAD)   /* one sealed datagram of the send arena */
#define TYPE_TOKEN 1

typedef struct {
    struct sockaddr_storage ss;
    socklen_t len;
} addr_t;

typedef struct {
    uint32_t node;
    uint64_t heard;
    addr_t addr;
} peer_t;

/* Output for Python: a run of deliveries (records, then their data), or one datagram. */
typedef struct chunk {
    struct chunk *next;
    int is_packet;
    gc_pump_packet_t packet;     /* is_packet: its length and source */
    size_t n;                    /* delivery records */
    size_t len;                  /* data bytes after the records */
    gc_action_t recs[];
} chunk_t;

/* A message submitted while the lock was taken. */
typedef struct msg {
    struct msg *next;
    size_t len;
    int flags;
    uint8_t payload[];
} msg_t;

/* Records + data arena, gc_ring_take's format: what Python took last. */
typedef struct {
    gc_action_t *recs;
    size_t n, cap;
    uint8_t *data;
    size_t len, dcap;
} deliveries_t;

typedef struct {
    gc_pump_packet_t *recs;
    size_t n, cap;
    uint8_t *data;
    size_t len, dcap;
} packets_t;

struct gc_pump {
    gc_ring_t *ring;
    gc_pump_config_t cfg;
    size_t max_payload;
    pthread_mutex_t mu;
    pthread_t thread;
    int running;
    int stopping;
    int oom;                     /* a delivery was lost: Python raises MemoryError */
    int ep;                      /* sockets + wake_fd */
    int ep_wake;                 /* wake_fd only: used while paused */
    int wake_fd;                 /* Python -> thread */
    int notify_fd;               /* thread -> Python */
    uint64_t armed;              /* the deadline the thread sleeps toward */

    addr_t group;
    int has_group;
    addr_t targets[TARGETS_MAX];
    uint8_t target_fixed[TARGETS_MAX];   /* from gc_pump_add_target (kept); else learnt from a peer */
    size_t n_targets;
    peer_t peers[GC_PUMP_PEERS_MAX];
    size_t n_peers;

    /* lock-free hand-offs (atomics) */
    chunk_t *outq;               /* to Python, newest first */
    size_t queued_records;
    size_t queued_bytes;
    size_t queued_packets;
    int paused;                  /* the thread stopped reading until Python takes */
    msg_t *inbox;                /* from Python, newest first */
    size_t inbox_count;          /* messages in inbox + carry */
    size_t pending;              /* gc_ring_pending() as of the last locked call */
    uint64_t ring_seq;           /* gc_ring_ring_seq() as of the last locked call */

    /* under the lock */
    msg_t *carry, *carry_tail;   /* drained from the inbox, not yet taken by the ring (it was full) */

    /* Python's last take: touched by gc_pump_take only */
    deliveries_t taken;
    packets_t taken_packets;
    chunk_t *held, *held_tail;   /* swapped out of outq but left for the next take (take_max), oldest first */

    /* receive side: thread only */
    uint8_t *slots;
    struct mmsghdr *rmsgs;
    struct iovec *riov;
    struct sockaddr_storage *raddr;
    uint8_t *stash;
    size_t stash_len[TOKEN_STASH];
    struct sockaddr_storage stash_from[TOKEN_STASH];
    socklen_t stash_fromlen[TOKEN_STASH];
    int stash_newest[TOKEN_STASH];
    size_t n_stash;
    uint8_t *opened;             /* the datagram inside the seal being read (cfg.seal only) */

    /* send side: under the lock */
    struct mmsghdr smsgs[SEND_BATCH];
    struct iovec siov[SEND_BATCH];
    size_t n_send;
    uint8_t *sealed;             /* SEND_BATCH sealed datagrams (cfg.seal only) ... */
    size_t n_sealed;             /* ... of which in use; reused only after a send_flush */

    gc_pump_stats_t stats;       /* under the lock */
};

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */
/* ------------------------------------------------------------------ */

uint64_t gc_pump_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint32_t rd32(const uint8_t *b)
{
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

static void eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t rc = write(fd, &one, sizeof one);
    (void)rc;                    /* EAGAIN: the counter is already non-zero, which is all we need */
}

static void eventfd_clear(int fd)
{
    uint64_t count;
    ssize_t rc = read(fd, &count, sizeof count);
    (void)rc;
}

/* Grow *buf to hold `need` items of `size` bytes (doubling). */
static int reserve(void **buf, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *b = realloc(*buf, n * size);
    if (!b) return -1;
    *buf = b;
    *cap = n;
    return 0;
}

/* Same host and port (IPv6 flow info and scope ignored, as channel.py's addr[:2]). */
static int same_addr(const addr_t *a, const struct sockaddr_storage *ss, socklen_t len)
{
    if (a->len != len || a->ss.ss_family != ss->ss_family) return 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)&a->ss, *y = (const void *)ss;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)&a->ss, *y = (const void *)ss;
        return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
    }
    return memcmp(&a->ss, ss, len) == 0;
}

static int make_addr(addr_t *out, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id)
{
    memset(out, 0, sizeof *out);
    if (family == AF_INET) {
        struct sockaddr_in *s = (void *)&out->ss;
        s->sin_family = AF_INET;
        s->sin_port = htons(port);
        memcpy(&s->sin_addr, addr, 4);
        out->len = sizeof *s;
        return GC_OK;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *s = (void *)&out->ss;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons(port);
        s->sin6_scope_id = scope_id;
        memcpy(&s->sin6_addr, addr, 16);
        out->len = sizeof *s;
        return GC_OK;
    }
    return GC_EINVAL;
}

static void add_target(gc_pump_t *p, const struct sockaddr_storage *ss, socklen_t len, int fixed)
{
    for (size_t i = 0; i < p->n_targets; i++)
        if (same_addr(&p->targets[i], ss, len)) {
            p->target_fixed[i] |= (uint8_t)fixed;
            return;
        }
    if (p->n_targets == TARGETS_MAX) return;
    memcpy(&p->targets[p->n_targets].ss, ss, len);
    p->targets[p->n_targets].len = len;
    p->target_fixed[p->n_targets] = (uint8_t)fixed;
    p->n_targets++;
}

static peer_t *find_peer(gc_pump_t *p, uint32_t node)
{
    for (size_t i = 0; i < p->n_peers; i++)
        if (p->peers[i].node == node) return &p->peers[i];
    return NULL;
}

/* A packet of our cluster came from `node` at `from`: remember where it lives. */
static void learn_peer(gc_pump_t *p, uint32_t node, const struct sockaddr_storage *from, socklen_t len,
                       uint64_t now)
{
    peer_t *e = find_peer(p, node);
    if (!e) {
        if (p->n_peers < GC_PUMP_PEERS_MAX) {
            e = &p->peers[p->n_peers++];
        } else {
            e = &p->peers[0];
            for (size_t i = 1; i < p->n_peers; i++)
                if (p->peers[i].heard < e->heard) e = &p->peers[i];
        }
        e->node = node;
        e->addr.len = 0;
    }
    e->heard = now;
    if (!same_addr(&e->addr, from, len)) {
        memcpy(&e->addr.ss, from, len);
        e->addr.len = len;
        if (!p->has_group) add_target(p, from, len, 0);
    }
}

/* ------------------------------------------------------------------ */
/* Sending (mutex held)                                                 */
/* ------------------------------------------------------------------ */

static void send_flush(gc_pump_t *p)
{
    size_t done = 0;
    while (done < p->n_send) {
        int rc = sendmmsg(p->cfg.unicast_fd, p->smsgs + done, (unsigned)(p->n_send - done), MSG_DONTWAIT);
        if (rc < 0) {
            if (errno == EINTR) continue;
            p->stats.send_errors++;          /* this datagram is lost; UDP, the ring retransmits */
            done++;
        } else {
            p->stats.sends += (uint64_t)rc;
            done += (size_t)rc;
        }
    }
    p->n_send = 0;
}

/* Queue one datagram; `buf` must stay valid until send_flush (the ring's
   output, or the caller's buffer). */
static void send_queue(gc_pump_t *p, const uint8_t *buf, size_t len, const addr_t *to)
{
    if (p->n_send == SEND_BATCH) send_flush(p);
    size_t i = p->n_send++;
    p->siov[i].iov_base = (void *)buf;
    p->siov[i].iov_len = len;
    memset(&p->smsgs[i], 0, sizeof p->smsgs[i]);
    p->smsgs[i].msg_hdr.msg_name = (void *)&to->ss;
    p->smsgs[i].msg_hdr.msg_namelen = to->len;
    p->smsgs[i].msg_hdr.msg_iov = &p->siov[i];
    p->smsgs[i].msg_hdr.msg_iovlen = 1;
}

/* With a key, the sealed copy of `buf` in the send arena (NULL if it cannot be sealed).
   A slot is reused only after a send_flush, so every queued copy stays valid. */
static const uint8_t *seal_out(gc_pump_t *p, uint32_t to, const uint8_t *buf, size_t *len)
{
    if (!p->cfg.seal) return buf;
    if (p->n_sealed == SEND_BATCH) {
        send_flush(p);
        p->n_sealed = 0;
    }
    uint8_t *dst = p->sealed + p->n_sealed * SEALED_SLOT;
    long n = gc_seal_close(p->cfg.seal, to, buf, *len, dst, SEALED_SLOT);
    if (n < 0) {
        p->stats.seal_errors++;
        return NULL;
    }
    p->n_sealed++;
    *len = (size_t)n;
    return dst;
}

static void send_all(gc_pump_t *p, const uint8_t *buf, size_t len)
{
    buf = seal_out(p, 0, buf, &len);        /* one seal for every copy */
    if (!buf) return;
    if (p->has_group) {
        send_queue(p, buf, len, &p->group);
        return;
    }
    for (size_t i = 0; i < p->n_targets; i++) send_queue(p, buf, len, &p->targets[i]);
}

static void send_to(gc_pump_t *p, uint32_t node, const uint8_t *buf, size_t len)
{
    const peer_t *e = find_peer(p, node);
    if (!e || e->addr.len == 0) {
        p->stats.unknown_dest++;
        return;
    }
    buf = seal_out(p, node, buf, &len);     /* only `node` will open it */
    if (buf) send_queue(p, buf, len, &e->addr);
}

/* ------------------------------------------------------------------ */
/* Output for Python: a lock-free list, swapped out whole by Python     */
/* ------------------------------------------------------------------ */

static int backlog_full(gc_pump_t *p)
{
    return __atomic_load_n(&p->queued_records, __ATOMIC_SEQ_CST) >= p->cfg.max_backlog ||
           __atomic_load_n(&p->queued_bytes, __ATOMIC_SEQ_CST) >= p->cfg.max_backlog_bytes;
}

/* Lock held (so one producer at a time; Python only ever swaps the list out).
   Python reads the eventfd before it takes, so the signal sent when the list
   goes from empty to non-empty is never lost. */
static void push_output(gc_pump_t *p, chunk_t *c)
{
    __atomic_add_fetch(&p->queued_records, c->n, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&p->queued_bytes, c->len, __ATOMIC_SEQ_CST);
    chunk_t *old = __atomic_load_n(&p->outq, __ATOMIC_RELAXED);
    do {
        c->next = old;
    } while (!__atomic_compare_exchange_n(&p->outq, &old, c, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    if (!old) {
        eventfd_signal(p->notify_fd);
        p->stats.notifies++;
    }
}

static uint8_t *chunk_data(chunk_t *c) { return (uint8_t *)(c->recs + c->n); }

/* The deliveries and configuration changes among the ring's outputs, as one chunk. */
static void queue_deliveries(gc_pump_t *p, const gc_action_t *acts, size_t n, const uint8_t *data,
                             size_t n_deliver, size_t bytes)
{
    chunk_t *c = bytes <= UINT32_MAX ? malloc(sizeof *c + n_deliver * sizeof(gc_action_t) + bytes) : NULL;
    if (!c) {
        __atomic_store_n(&p->oom, 1, __ATOMIC_RELAXED);
        return;
    }
    memset(c, 0, sizeof *c);
    c->n = n_deliver;
    c->len = bytes;
    uint8_t *out = chunk_data(c);
    size_t k = 0, off = 0;
    for (size_t i = 0; i < n; i++) {
        if (acts[i].kind == GC_ACT_SEND_MCAST || acts[i].kind == GC_ACT_SEND_UNICAST) continue;
        c->recs[k] = acts[i];
        c->recs[k].offset = (uint32_t)off;
        if (acts[i].len) memcpy(out + off, data + acts[i].offset, acts[i].len);
        off += acts[i].len;
        k++;
    }
    push_output(p, c);
}

static void to_python(gc_pump_t *p, const uint8_t *buf, size_t len, const struct sockaddr_storage *from,
                      int newest)
{
    chunk_t *c = NULL;
    if (__atomic_load_n(&p->queued_packets, __ATOMIC_RELAXED) < PACKETS_MAX) c = malloc(sizeof *c + len);
    if (!c) {
        p->stats.python_drops++;             /* like a full socket buffer: the sender retries */
        return;
    }
    memset(c, 0, sizeof *c);
    c->is_packet = 1;
    c->len = len;
    gc_pump_packet_t *rec = &c->packet;
    rec->len = (uint32_t)len;
    rec->newest = newest != 0;
    rec->family = from->ss_family;
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)from;
        rec->port = ntohs(s->sin_port);
        memcpy(rec->addr, &s->sin_addr, 4);
    } else if (from->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)from;
        rec->port = ntohs(s->sin6_port);
        rec->scope_id = s->sin6_scope_id;
        memcpy(rec->addr, &s->sin6_addr, 16);
    }
    memcpy(chunk_data(c), buf, len);
    __atomic_add_fetch(&p->queued_packets, 1, __ATOMIC_RELAXED);
    push_output(p, c);
    p->stats.to_python++;
}

static int take_chunk(gc_pump_t *p, chunk_t *c)
{
    if (c->is_packet) {
        packets_t *b = &p->taken_packets;
        if (reserve((void **)&b->recs, &b->cap, b->n + 1, sizeof *b->recs) < 0 ||
            reserve((void **)&b->data, &b->dcap, b->len + c->len, 1) < 0)
            return -1;
        b->recs[b->n] = c->packet;
        b->recs[b->n].offset = (uint32_t)b->len;
        b->n++;
        memcpy(b->data + b->len, chunk_data(c), c->len);
        b->len += c->len;
        return 0;
    }
    deliveries_t *b = &p->taken;
    if (b->len + c->len > UINT32_MAX ||
        reserve((void **)&b->recs, &b->cap, b->n + c->n, sizeof *b->recs) < 0 ||
        reserve((void **)&b->data, &b->dcap, b->len + c->len, 1) < 0)
        return -1;
    for (size_t i = 0; i < c->n; i++) {
        b->recs[b->n + i] = c->recs[i];
        b->recs[b->n + i].offset += (uint32_t)b->len;
    }
    b->n += c->n;
    memcpy(b->data + b->len, chunk_data(c), c->len);
    b->len += c->len;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Input from Python: submits that found the lock taken                 */
/* ------------------------------------------------------------------ */

/* Before the outputs of the same call are queued: whoever sees those sees this ring seq. */
static void publish_ring_seq(gc_pump_t *p)
{
    __atomic_store_n(&p->ring_seq, gc_ring_ring_seq(p->ring), __ATOMIC_SEQ_CST);
}

static void publish_pending(gc_pump_t *p)
{
    __atomic_store_n(&p->pending, gc_ring_pending(p->ring), __ATOMIC_SEQ_CST);
}

/* Lock held: move the inbox into the ring, oldest first. */
static void drain_inbox(gc_pump_t *p)
{
    msg_t *m = __atomic_exchange_n(&p->inbox, NULL, __ATOMIC_ACQUIRE);
    msg_t *fifo = NULL;
    while (m) {                              /* the inbox is newest first */
        msg_t *next = m->next;
        m->next = fifo;
        fifo = m;
        m = next;
    }
    if (fifo) {
        msg_t *tail = fifo;
        while (tail->next) tail = tail->next;
        if (p->carry_tail) p->carry_tail->next = fifo;
        else p->carry = fifo;
        p->carry_tail = tail;
    }
    if (!p->carry) return;
    uint64_t now = gc_pump_now_us();
    while (p->carry) {
        msg_t *x = p->carry;
        int rc = gc_ring_submit(p->ring, now, x->payload, x->len, x->flags);
        if (rc == GC_EQUEUEFULL) break;      /* keep it, in order, for the next lock holder */
        if (rc < 0) p->stats.submit_drops++;
        if (rc == GC_ENOMEM) __atomic_store_n(&p->oom, 1, __ATOMIC_RELAXED);
        p->carry = x->next;
        if (!p->carry) p->carry_tail = NULL;
        free(x);
        publish_pending(p);                  /* before the count drops: the room check never overshoots */
        __atomic_sub_fetch(&p->inbox_count, 1, __ATOMIC_SEQ_CST);
    }
}

static void push_inbox(gc_pump_t *p, msg_t *m)
{
    __atomic_add_fetch(&p->inbox_count, 1, __ATOMIC_SEQ_CST);
    msg_t *old = __atomic_load_n(&p->inbox, __ATOMIC_RELAXED);
    do {
        m->next = old;
    } while (!__atomic_compare_exchange_n(&p->inbox, &old, m, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
}

/* ------------------------------------------------------------------ */
/* Driving the ring (lock held)                                         */
/* ------------------------------------------------------------------ */

static void service(gc_pump_t *p, int from_thread)
{
    const gc_action_t *acts;
    const uint8_t *data;
    size_t n, len, n_deliver = 0, bytes = 0;
    gc_ring_take(p->ring, &acts, &n, &data, &len);
    publish_ring_seq(p);
    for (size_t i = 0; i < n; i++) {
        if (acts[i].kind != GC_ACT_SEND_MCAST && acts[i].kind != GC_ACT_SEND_UNICAST) {
            n_deliver++;
            bytes += acts[i].len;
        }
    }
    /* Deliveries first: Python's wake-up then overlaps the sends (a multicast on one
       host is delivered to every local socket inside sendmmsg).  Before the ring's next
       input either way; the order of the sends among themselves is the ring's. */
    if (n_deliver) queue_deliveries(p, acts, n, data, n_deliver, bytes);
    for (size_t i = 0; i < n; i++) {
        const gc_action_t *a = &acts[i];
        if (a->kind == GC_ACT_SEND_MCAST) send_all(p, data + a->offset, a->len);
        else if (a->kind == GC_ACT_SEND_UNICAST) send_to(p, a->node, data + a->offset, a->len);
    }
    send_flush(p);
    publish_pending(p);
    if (!from_thread) {
        uint64_t d = gc_ring_next_deadline(p->ring);
        if (d < p->armed) {                  /* Python's input moved a timer earlier: re-arm the thread */
            p->armed = d;
            p->stats.kicks++;
            eventfd_signal(p->wake_fd);
        }
    }
}

static void enter(gc_pump_t *p)
{
    pthread_mutex_lock(&p->mu);
    drain_inbox(p);
}

/* Service, unlock, and if a submit queued a message meanwhile and the lock is
   free, take it back to submit it: whoever fails to get the lock after
   queuing relies on this check (both sides fence, so one of them sees the other). */
static void leave(gc_pump_t *p, int from_thread)
{
    service(p, from_thread);
    for (;;) {
        pthread_mutex_unlock(&p->mu);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (!__atomic_load_n(&p->inbox, __ATOMIC_SEQ_CST)) return;
        if (pthread_mutex_trylock(&p->mu) != 0) return;      /* its holder will drain it */
        drain_inbox(p);
        service(p, from_thread);
    }
}

int gc_pump_classify(const uint8_t *buf, size_t len, uint32_t node_id)
{
    int ours = len >= 2 && buf[0] == 'G';
    if (ours && buf[1] == 'P') return GC_DGRAM_PROBE;
    if (len >= HDR_LEN && rd32(buf + 8) == node_id) return GC_DGRAM_SELF;
    if (ours && buf[1] != 'C') return GC_DGRAM_MEMBER;
    if (ours && len > 2 && buf[2] != GC_WIRE_VERSION) return GC_DGRAM_MEMBER;
    if (ours && len > 3 && buf[3] == TYPE_TOKEN) return GC_DGRAM_TOKEN;
    return GC_DGRAM_RING;
}

/* Feed the ring; a packet it took as coming from a live peer teaches us where that peer is. */
static void ring_receive(gc_pump_t *p, uint64_t now, const uint8_t *buf, size_t len,
                         const struct sockaddr_storage *from, socklen_t fromlen, int newest)
{
    int rc = gc_ring_receive(p->ring, now, buf, len);
    if (rc == GC_ENOMEM) __atomic_store_n(&p->oom, 1, __ATOMIC_RELAXED);
    if ((rc == GC_OK || rc == GC_ESTALE || rc == GC_EIGNORED) && len >= HDR_LEN && newest)
        learn_peer(p, rd32(buf + 8), from, fromlen, now);
}

/* One datagram: sorted by gc_pump_classify, as the trio driver sorts them. */
static void on_datagram(gc_pump_t *p, uint64_t now, const uint8_t *buf, size_t len,
                        const struct sockaddr_storage *from, socklen_t fromlen)
{
    uint32_t sealed_flags = GC_SEAL_NEWEST;  /* without a key: the ring's checks decide alone */
    if (p->cfg.seal) {                       /* nothing is looked at before it authenticates */
        uint32_t sealer;
        long n = gc_seal_open(p->cfg.seal, buf, len, p->opened, p->cfg.slot_size, &sealer, &sealed_flags);
        if (n < 0) {
            if (n == GC_SEAL_DROP_SELF) p->stats.self_drops++;
            else p->stats.seal_drops++;
            return;
        }
        buf = p->opened;
        len = (size_t)n;
    }
    int newest = (sealed_flags & GC_SEAL_NEWEST) != 0;   /* only such a datagram may move an address */
    switch (gc_pump_classify(buf, len, p->cfg.node_id)) {
    case GC_DGRAM_PROBE:
    case GC_DGRAM_MEMBER:
        to_python(p, buf, len, from, newest);
        return;
    case GC_DGRAM_SELF:
        p->stats.self_drops++;
        return;
    case GC_DGRAM_TOKEN:
        if (p->n_stash < TOKEN_STASH) {
            memcpy(p->stash + p->n_stash * p->cfg.slot_size, buf, len);
            memcpy(&p->stash_from[p->n_stash], from, fromlen);
            p->stash_fromlen[p->n_stash] = fromlen;
            p->stash_newest[p->n_stash] = newest;
            p->stash_len[p->n_stash++] = len;
            return;
        }
        break;
    default:
        break;
    }
    ring_receive(p, now, buf, len, from, fromlen, newest);   /* the core validates everything else */
}

/* ------------------------------------------------------------------ */
/* The thread                                                           */
/* ------------------------------------------------------------------ */

/* One recvmmsg batch from `fd` (at most cfg.batch datagrams: about 1 MiB),
   fed to the ring under the lock.  Returns 1 if the batch was full (more
   may wait), 0 once the socket is drained. */
static int drain_batch(gc_pump_t *p, int fd)
{
    for (;;) {
        for (uint32_t i = 0; i < p->cfg.batch; i++) {
            p->rmsgs[i].msg_hdr.msg_namelen = sizeof p->raddr[i];
            p->rmsgs[i].msg_hdr.msg_flags = 0;
        }
        int n = recvmmsg(fd, p->rmsgs, p->cfg.batch, MSG_DONTWAIT, NULL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;                /* EAGAIN: drained */
        enter(p);
        uint64_t now = gc_pump_now_us();
        p->stats.batches++;
        p->stats.datagrams += (uint64_t)n;
        for (int i = 0; i < n; i++) {
            const struct msghdr *h = &p->rmsgs[i].msg_hdr;
            if (h->msg_flags & MSG_TRUNC) {
                p->stats.drops++;
                continue;
            }
            on_datagram(p, now, p->slots + (size_t)i * p->cfg.slot_size, p->rmsgs[i].msg_len,
                        &p->raddr[i], h->msg_namelen);
        }
        leave(p, 1);
        return (uint32_t)n == p->cfg.batch;
    }
}

/* After a round's batches: the held-back tokens, then due timers. */
static void finish_round(gc_pump_t *p)
{
    enter(p);
    uint64_t now = gc_pump_now_us();
    for (size_t i = 0; i < p->n_stash; i++)
        ring_receive(p, now, p->stash + i * p->cfg.slot_size, p->stash_len[i], &p->stash_from[i],
                     p->stash_fromlen[i], p->stash_newest[i]);
    p->n_stash = 0;
    if (gc_ring_next_deadline(p->ring) <= now) {
        gc_ring_tick(p->ring, now);
        p->stats.ticks++;
    }
    leave(p, 1);
}

/* A wake-up's reading, in rounds: one batch of multicast (messages) and one
   of unicast (tokens), then the tokens and due timers, and the lock is
   released after each step.  So under a flood of large messages a token
   waits for at most one batch of messages, never for a whole burst, and
   Python's calls get the lock between batches. */
static void drain_rounds(gc_pump_t *p, int readable_mc, int readable_uc)
{
    for (int round = 0; round < DRAIN_ROUNDS_MAX; round++) {
        if (readable_mc) readable_mc = drain_batch(p, p->cfg.multicast_fd);   /* messages first, then tokens */
        if (readable_uc) readable_uc = drain_batch(p, p->cfg.unicast_fd);
        finish_round(p);
        if ((!readable_mc && !readable_uc) || backlog_full(p)) return;
    }
}

static int timeout_ms(uint64_t deadline)
{
    if (deadline == NEVER) return -1;
    uint64_t now = gc_pump_now_us();
    if (deadline <= now) return 0;
    uint64_t ms = (deadline - now + 999) / 1000;   /* round up: never tick early */
    return ms > 60000 ? 60000 : (int)ms;
}

/* Python fell behind: stop reading until it takes.  Raising the flag before
   the second look pairs with gc_pump_take lowering the count before it looks
   at the flag, so one of the two sees the other. */
static int should_pause(gc_pump_t *p)
{
    if (!backlog_full(p)) return 0;
    __atomic_store_n(&p->paused, 1, __ATOMIC_SEQ_CST);
    if (backlog_full(p)) return 1;
    __atomic_store_n(&p->paused, 0, __ATOMIC_SEQ_CST);
    return 0;
}

static void *pump_main(void *arg)
{
    gc_pump_t *p = arg;
    struct epoll_event ev[EVENTS_MAX];
    for (;;) {
        enter(p);
        int stop = p->stopping;
        int paused = should_pause(p);
        if (paused) p->stats.pauses++;
        uint64_t deadline = paused ? NEVER : gc_ring_next_deadline(p->ring);
        p->armed = deadline;
        leave(p, 1);
        if (stop) break;

        int n = epoll_wait(paused ? p->ep_wake : p->ep, ev, EVENTS_MAX, timeout_ms(deadline));
        int readable_mc = 0, readable_uc = 0;
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            if (fd == p->wake_fd) eventfd_clear(fd);
            else if (fd == p->cfg.multicast_fd) readable_mc = 1;
            else if (fd == p->cfg.unicast_fd) readable_uc = 1;
        }
        enter(p);
        p->stats.wakeups++;
        leave(p, 1);
        if (paused) continue;
        drain_rounds(p, readable_mc, readable_uc);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* API                                                                  */
/* ------------------------------------------------------------------ */

static int epoll_add(int ep, int fd)
{
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = EPOLLIN;
    e.data.fd = fd;
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}

static int setup_receive(gc_pump_t *p)
{
    size_t batch = p->cfg.batch, slot = p->cfg.slot_size;
    p->slots = malloc(batch * slot);
    p->stash = malloc(TOKEN_STASH * slot);
    p->rmsgs = calloc(batch, sizeof *p->rmsgs);
    p->riov = calloc(batch, sizeof *p->riov);
    p->raddr = calloc(batch, sizeof *p->raddr);
    if (!p->slots || !p->stash || !p->rmsgs || !p->riov || !p->raddr) return GC_ENOMEM;
    if (p->cfg.seal) {
        p->opened = malloc(slot);
        p->sealed = malloc((size_t)SEND_BATCH * SEALED_SLOT);
        if (!p->opened || !p->sealed) return GC_ENOMEM;
    }
    for (size_t i = 0; i < batch; i++) {
        p->riov[i].iov_base = p->slots + i * slot;
        p->riov[i].iov_len = slot;
        p->rmsgs[i].msg_hdr.msg_iov = &p->riov[i];
        p->rmsgs[i].msg_hdr.msg_iovlen = 1;
        p->rmsgs[i].msg_hdr.msg_name = &p->raddr[i];
    }
    return GC_OK;
}

static int setup_fds(gc_pump_t *p)
{
    p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    p->ep_wake = epoll_create1(EPOLL_CLOEXEC);
    if (p->wake_fd < 0 || p->notify_fd < 0 || p->ep < 0 || p->ep_wake < 0) return GC_ENOMEM;
    if (epoll_add(p->ep, p->wake_fd) < 0 || epoll_add(p->ep_wake, p->wake_fd) < 0 ||
        epoll_add(p->ep, p->cfg.unicast_fd) < 0 ||
        (p->cfg.multicast_fd >= 0 && epoll_add(p->ep, p->cfg.multicast_fd) < 0))
        return GC_EINVAL;
    return GC_OK;
}

int gc_pump_new(gc_ring_t *ring, const gc_pump_config_t *cfg, gc_pump_t **out)
{
    if (!ring || !cfg || !out || cfg->unicast_fd < 0 || cfg->slot_size < HDR_LEN || cfg->batch == 0 ||
        cfg->batch > 1024 || cfg->max_backlog == 0 || cfg->max_backlog_bytes == 0 || cfg->send_queue_max == 0 ||
        cfg->take_max == 0 || cfg->take_max_bytes == 0)
        return GC_EINVAL;
    *out = NULL;
    gc_pump_t *p = calloc(1, sizeof *p);
    if (!p) return GC_ENOMEM;
    p->ring = ring;
    p->cfg = *cfg;
    p->max_payload = gc_ring_max_payload(ring);
    p->wake_fd = p->notify_fd = p->ep = p->ep_wake = -1;
    p->armed = NEVER;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    /* Hold times are microseconds: spin briefly before sleeping, since a
       futex sleep and wake-up costs tens of microseconds. */
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(&p->mu, &attr);
    pthread_mutexattr_destroy(&attr);
    publish_pending(p);
    publish_ring_seq(p);
    int rc = setup_receive(p);
    if (rc == GC_OK) rc = setup_fds(p);
    if (rc != GC_OK) {
        gc_pump_free(p);
        return rc;
    }
    *out = p;
    return GC_OK;
}

static void close_fd(int fd)
{
    if (fd >= 0) close(fd);
}

static void free_msgs(msg_t *m)
{
    while (m) {
        msg_t *next = m->next;
        free(m);
        m = next;
    }
}

void gc_pump_free(gc_pump_t *p)
{
    if (!p) return;
    gc_pump_stop(p);
    close_fd(p->wake_fd);
    close_fd(p->notify_fd);
    close_fd(p->ep);
    close_fd(p->ep_wake);
    for (chunk_t *c = p->outq; c;) {
        chunk_t *next = c->next;
        free(c);
        c = next;
    }
    for (chunk_t *c = p->held; c;) {
        chunk_t *next = c->next;
        free(c);
        c = next;
    }
    free_msgs(p->inbox);
    free_msgs(p->carry);
    free(p->taken.recs);
    free(p->taken.data);
    free(p->taken_packets.recs);
    free(p->taken_packets.data);
    free(p->slots);
    free(p->stash);
    free(p->opened);
    free(p->sealed);
    free(p->rmsgs);
    free(p->riov);
    free(p->raddr);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

int gc_pump_set_group(gc_pump_t *p, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id)
{
    if (!p || !addr) return GC_EINVAL;
    addr_t a;
    int rc = make_addr(&a, family, addr, port, scope_id);
    if (rc != GC_OK) return rc;
    enter(p);
    p->group = a;
    p->has_group = 1;
    leave(p, 0);
    return GC_OK;
}

int gc_pump_add_target(gc_pump_t *p, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id)
{
    if (!p || !addr) return GC_EINVAL;
    addr_t a;
    int rc = make_addr(&a, family, addr, port, scope_id);
    if (rc != GC_OK) return rc;
    enter(p);
    add_target(p, &a.ss, a.len, 1);
    leave(p, 0);
    return GC_OK;
}

size_t gc_pump_forget(gc_pump_t *p, const uint32_t *members, size_t n, uint64_t silent_since)
{
    if (!p || (!members && n)) return 0;
    enter(p);
    size_t kept = 0;
    for (size_t i = 0; i < p->n_peers; i++) {
        int member = 0;
        for (size_t j = 0; j < n && !member; j++) member = members[j] == p->peers[i].node;
        if (member || p->peers[i].heard >= silent_since) p->peers[kept++] = p->peers[i];
    }
    p->n_peers = kept;
    size_t targets = 0;                      /* the fixed ones and those of the peers kept */
    for (size_t i = 0; i < p->n_targets; i++) {
        int keep = p->target_fixed[i];
        for (size_t j = 0; j < kept && !keep; j++)
            keep = same_addr(&p->targets[i], &p->peers[j].addr.ss, p->peers[j].addr.len);
        if (keep) {
            p->targets[targets] = p->targets[i];
            p->target_fixed[targets++] = p->target_fixed[i];
        }
    }
    p->n_targets = targets;
    leave(p, 0);
    return kept;
}

int gc_pump_start(gc_pump_t *p)
{
    if (!p || p->running) return GC_EINVAL;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* signals stay with Python's main thread */
    int rc = pthread_create(&p->thread, NULL, pump_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) return GC_ENOMEM;
    p->running = 1;
    return GC_OK;
}

int gc_pump_stop(gc_pump_t *p)
{
    if (!p) return GC_EINVAL;
    if (!p->running) return GC_OK;
    enter(p);
    p->stopping = 1;
    leave(p, 0);
    eventfd_signal(p->wake_fd);
    pthread_join(p->thread, NULL);
    p->running = 0;
    p->stopping = 0;
    return GC_OK;
}

int gc_pump_notify_fd(const gc_pump_t *p) { return p ? p->notify_fd : -1; }

void gc_pump_lock(gc_pump_t *p) { enter(p); }

int gc_pump_unlock(gc_pump_t *p)
{
    leave(p, 0);
    return __atomic_load_n(&p->oom, __ATOMIC_RELAXED) ? GC_ENOMEM : GC_OK;
}

int gc_pump_submit(gc_pump_t *p, const uint8_t *payload, size_t len, int flags)
{
    if (!p || (!payload && len) || flags < 0 || flags > 0xFF) return GC_EINVAL;
    if (len > p->max_payload) return GC_ETOOBIG;
    if (gc_pump_pending(p) >= p->cfg.send_queue_max) return GC_EQUEUEFULL;
    if (__atomic_load_n(&p->inbox_count, __ATOMIC_SEQ_CST) == 0 && pthread_mutex_trylock(&p->mu) == 0) {
        drain_inbox(p);
        int rc = gc_ring_submit(p->ring, gc_pump_now_us(), payload, len, flags);
        leave(p, 0);
        return rc == GC_OUTPUT ? GC_OK : rc;
    }
    msg_t *m = malloc(sizeof *m + len);
    if (!m) return GC_ENOMEM;
    m->len = len;
    m->flags = flags;
    if (len) memcpy(m->payload, payload, len);
    push_inbox(p, m);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    __atomic_add_fetch(&p->stats.handoffs, 1, __ATOMIC_RELAXED);
    if (pthread_mutex_trylock(&p->mu) == 0) {
        drain_inbox(p);
        leave(p, 0);
    }
    return GC_OK;
}

int gc_pump_submit_many(gc_pump_t *p, const uint8_t *data, const uint32_t *lens, size_t n, int flags,
                        size_t *taken)
{
    if (!p || !taken || (!lens && n) || flags < 0 || flags > 0xFF) return GC_EINVAL;
    *taken = 0;
    size_t pending = gc_pump_pending(p);
    size_t room = pending < p->cfg.send_queue_max ? p->cfg.send_queue_max - pending : 0;
    size_t k = 0, off = 0;
    int rc = GC_OK;
    if (__atomic_load_n(&p->inbox_count, __ATOMIC_SEQ_CST) == 0 && pthread_mutex_trylock(&p->mu) == 0) {
        drain_inbox(p);
        uint64_t now = gc_pump_now_us();
        for (; k < n; k++) {
            rc = lens[k] > p->max_payload ? GC_ETOOBIG : gc_ring_submit(p->ring, now, data + off, lens[k], flags);
            if (rc < 0) break;
            off += lens[k];
        }
        leave(p, 0);
    } else {                                 /* the lock is taken: queue them for its holder, in order */
        for (; k < n; k++) {
            if (lens[k] > p->max_payload) { rc = GC_ETOOBIG; break; }
            if (k >= room) { rc = GC_EQUEUEFULL; break; }
            msg_t *m = malloc(sizeof *m + lens[k]);
            if (!m) { rc = GC_ENOMEM; break; }
            m->len = lens[k];
            m->flags = flags;
            if (lens[k]) memcpy(m->payload, data + off, lens[k]);
            push_inbox(p, m);
            off += lens[k];
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        __atomic_add_fetch(&p->stats.handoffs, k, __ATOMIC_RELAXED);
        if (k && pthread_mutex_trylock(&p->mu) == 0) {
            drain_inbox(p);
            leave(p, 0);
        }
    }
    *taken = k;
    return k == n ? GC_OK : rc;
}

uint64_t gc_pump_ring_seq(const gc_pump_t *p)
{
    return p ? __atomic_load_n(&p->ring_seq, __ATOMIC_SEQ_CST) : 0;
}

size_t gc_pump_pending(const gc_pump_t *p)
{
    if (!p) return 0;
    return __atomic_load_n(&p->pending, __ATOMIC_SEQ_CST) + __atomic_load_n(&p->inbox_count, __ATOMIC_SEQ_CST);
}

/* Python's take: every datagram waiting, and deliveries in order up to
   take_max / take_max_bytes (whole chunks, at least one); the other chunks
   stay in p->held for the next take, which Python is told about. */
int gc_pump_take(gc_pump_t *p, gc_pump_batch_t *out)
{
    if (!p || !out) return GC_EINVAL;
    chunk_t *c = __atomic_exchange_n(&p->outq, NULL, __ATOMIC_ACQUIRE);
    chunk_t *fifo = NULL, *fifo_tail = c;
    while (c) {                              /* the list is newest first */
        chunk_t *next = c->next;
        c->next = fifo;
        fifo = c;
        c = next;
    }
    if (fifo) {
        if (p->held_tail) p->held_tail->next = fifo;
        else p->held = fifo;
        p->held_tail = fifo_tail;
    }
    p->taken.n = p->taken.len = 0;
    p->taken_packets.n = p->taken_packets.len = 0;
    size_t records = 0, bytes = 0, packets = 0, packet_bytes = 0;
    int failed = 0, full = 0;
    chunk_t **link = &p->held;
    p->held_tail = NULL;
    while (*link) {
        chunk_t *x = *link;
        if (!x->is_packet) {
            if (!full && records > 0 &&
                (records + x->n > p->cfg.take_max || (uint64_t)(bytes + x->len) > p->cfg.take_max_bytes))
                full = 1;
            if (full) {                      /* stays, in order, for the next take */
                p->held_tail = x;
                link = &x->next;
                continue;
            }
            records += x->n;
            bytes += x->len;
        } else {
            packets++;
            packet_bytes += x->len;
        }
        if (!failed && take_chunk(p, x) < 0) failed = 1;
        *link = x->next;
        free(x);
    }
    __atomic_sub_fetch(&p->queued_records, records, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&p->queued_bytes, bytes + packet_bytes, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&p->queued_packets, packets, __ATOMIC_RELAXED);
    if (full) {
        __atomic_add_fetch(&p->stats.takes_cut, 1, __ATOMIC_RELAXED);
        eventfd_signal(p->notify_fd);        /* come back for the rest */
    }
    if (__atomic_exchange_n(&p->paused, 0, __ATOMIC_SEQ_CST)) eventfd_signal(p->wake_fd);
    if (failed) __atomic_store_n(&p->oom, 1, __ATOMIC_RELAXED);
    if (__atomic_load_n(&p->oom, __ATOMIC_RELAXED)) return GC_ENOMEM;
    out->actions = p->taken.recs;
    out->n_actions = p->taken.n;
    out->data = p->taken.data;
    out->data_len = p->taken.len;
    out->packets = p->taken_packets.recs;
    out->n_packets = p->taken_packets.n;
    out->packet_data = p->taken_packets.data;
    out->packet_data_len = p->taken_packets.len;
    return GC_OK;
}

int gc_pump_send_all(gc_pump_t *p, const uint8_t *buf, size_t len)
{
    if (!p || !buf) return GC_EINVAL;
    enter(p);
    send_all(p, buf, len);
    send_flush(p);
    leave(p, 0);
    return GC_OK;
}

int gc_pump_send_to(gc_pump_t *p, uint32_t node, const uint8_t *buf, size_t len)
{
    if (!p || !buf) return GC_EINVAL;
    enter(p);
    send_to(p, node, buf, len);
    send_flush(p);
    leave(p, 0);
    return GC_OK;
}

int gc_pump_learn(gc_pump_t *p, uint32_t node, int family, const uint8_t *addr, uint16_t port, uint32_t scope_id)
{
    addr_t a;
    if (!p || node == 0 || !addr || make_addr(&a, family, addr, port, scope_id) != GC_OK) return GC_EINVAL;
    enter(p);
    learn_peer(p, node, &a.ss, a.len, gc_pump_now_us());
    leave(p, 0);
    return GC_OK;
}

size_t gc_pump_heard(gc_pump_t *p, uint32_t *nodes, uint64_t *times, size_t cap)
{
    if (!p || !nodes || !times) return 0;
    enter(p);
    size_t n = p->n_peers < cap ? p->n_peers : cap;
    for (size_t i = 0; i < n; i++) {
        nodes[i] = p->peers[i].node;
        times[i] = p->peers[i].heard;
    }
    leave(p, 0);
    return n;
}

void gc_pump_get_stats(gc_pump_t *p, gc_pump_stats_t *out)
{
    if (!p || !out) return;
    enter(p);
    *out = p->stats;
    out->handoffs = __atomic_load_n(&p->stats.handoffs, __ATOMIC_RELAXED);
    out->takes_cut = __atomic_load_n(&p->stats.takes_cut, __ATOMIC_RELAXED);
    leave(p, 0);
}
