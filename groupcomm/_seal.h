/*
 * groupcomm/_seal.h -- authenticated encryption of every datagram under the
 * cluster key (AES-256-GCM from OpenSSL's libcrypto).
 *
 * One implementation serves both socket drivers: the C pump calls it on its
 * thread, the trio driver through cffi.  The datagrams it wraps (ring, FD,
 * UNICAST, probe) are unchanged inside the seal.
 *
 * A sealed datagram:
 *
 *   offset size
 *   0      2    magic "GS"
 *   2      1    wire version (WIRE_VERSION of _ring.c, PROTOCOL_VERSION of wire.py)
 *   3      1    bit 7: authenticated only (payload in clear); bits 0-6: key id
 *   4      4    sender node id (big-endian)
 *   8      8    sender incarnation (big-endian; grows with every start of the node)
 *   16     8    counter (big-endian; never repeats within an incarnation)
 *   24     4    receiver node id (big-endian); 0: every member (a multicast)
 *   28     n    the datagram, encrypted (or in clear when authenticated only)
 *   28+n   16   GCM tag over bytes 0..27 (and the clear payload when authenticated only)
 *
 * Keys and nonces.  The cluster key never encrypts a datagram itself.  Each
 * sender encrypts with a subkey
 *     HKDF-SHA256(key, salt = "groupcomm-seal-v2",
 *                 info = cluster id | sender | incarnation | epoch)
 * where epoch = counter >> GC_SEAL_EPOCH_SHIFT, and the 96-bit GCM nonce is
 * four zero bytes then the counter.  A (sender, incarnation) pair is unique
 * (the incarnation is the start time in microseconds, kept above every
 * earlier one in the node's state directory), the counter never repeats, so
 * no nonce repeats under any subkey.  A sender moves to the next epoch (a new
 * subkey) after 2^24 datagrams or 2^34 bytes, far inside AES-GCM's limits.
 *
 * Replay.  Per sender the receiver keeps the newest incarnation and a window
 * of GC_SEAL_WINDOW counters; an older incarnation, a counter below the
 * window, or one seen before is dropped.  A datagram sealed for one receiver
 * is dropped by every other (so a unicast cannot be replayed to a member
 * that never saw it), and gc_seal_open says whether a datagram is the newest
 * yet from its sender: drivers move a peer's address only on those, so a
 * replay of an old datagram from elsewhere never redirects a member.  Entries are created only by
 * datagrams that authenticate; there are at most max_peers of them (the one
 * heard from least recently makes room).
 *
 * Cost under attack.  A datagram that does not authenticate changes nothing.
 * Deriving a subkey (a sender, incarnation or epoch not seen yet) is the one
 * costly step a forger can ask for; at most derive_budget derivations that
 * fail to authenticate are attempted per second, the rest are dropped
 * (drop_rate) before any crypto.
 *
 * Thread safety: every call takes the context's mutex.
 */
#ifndef GROUPCOMM_SEAL_H
#define GROUPCOMM_SEAL_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define GC_SEAL_VERSION 2       /* = WIRE_VERSION of _ring.c (tests/test_wire.py checks) */
#define GC_SEAL_HEADER 28
#define GC_SEAL_TAG 16
#define GC_SEAL_OVERHEAD 44
#define GC_SEAL_KEY_BYTES 32
#define GC_SEAL_KEYS_MAX 4
#define GC_SEAL_KEY_ID_MAX 127
#define GC_SEAL_WINDOW 1024
#define GC_SEAL_EPOCH_SHIFT 24

/* gc_seal_open's drop reasons (negative) */
#define GC_SEAL_DROP_SHORT -1        /* shorter than header + tag */
#define GC_SEAL_DROP_UNSEALED -2     /* not a sealed datagram (a key is required) */
#define GC_SEAL_DROP_VERSION -3      /* another wire version */
#define GC_SEAL_DROP_KEY -4          /* a key id we do not hold */
#define GC_SEAL_DROP_AUTH -5         /* failed authentication: forged, corrupted, or another key */
#define GC_SEAL_DROP_REPLAY -6       /* counter seen before, or below the replay window */
#define GC_SEAL_DROP_STALE -7        /* an incarnation older than the sender's newest */
#define GC_SEAL_DROP_SENDER -8       /* the datagram inside names another sender than the seal */
#define GC_SEAL_DROP_NODELIST -9     /* a sender outside the configured node list */
#define GC_SEAL_DROP_RATE -10        /* a new subkey over the derivation budget */
#define GC_SEAL_DROP_SPACE -11       /* output buffer too small (a local error) */
#define GC_SEAL_ENOKEY -12           /* gc_seal_close: no send key set */
#define GC_SEAL_EINVAL -13           /* bad argument */
#define GC_SEAL_ECRYPTO -14          /* libcrypto failed (out of memory) */
#define GC_SEAL_DROP_SELF -15        /* our own datagram, looped back by multicast */
#define GC_SEAL_DROP_MISDIRECTED -16 /* sealed for another receiver */
#define GC_SEAL_NEWEST 1             /* gc_seal_open's flags: the newest datagram yet from its sender */

typedef struct {
    uint64_t sealed;             /* datagrams sealed */
    uint64_t opened;             /* datagrams that authenticated */
    uint64_t drop_short, drop_unsealed, drop_version, drop_key, drop_auth, drop_replay,
             drop_stale, drop_sender, drop_nodelist, drop_rate, drop_self, drop_misdirected;
    uint64_t derivations;        /* subkeys derived (send and receive) */
    uint64_t new_incarnations;   /* senders first heard, or heard in a newer incarnation */
    uint64_t peers_evicted;      /* peer entries replaced because the table was full */
    uint64_t peers;              /* peer entries in use */
} gc_seal_stats_t;

typedef struct gc_seal gc_seal_t;

int gc_seal_new(uint32_t cluster_id, uint32_t node_id, uint64_t incarnation, int auth_only,
                uint32_t max_peers, uint32_t derive_budget, gc_seal_t **out);
void gc_seal_free(gc_seal_t *s);

/* Keys: up to GC_SEAL_KEYS_MAX held at once (a rotation), one of them the send key. */
int gc_seal_set_key(gc_seal_t *s, uint32_t key_id, const uint8_t *key, size_t len);
int gc_seal_forget_key(gc_seal_t *s, uint32_t key_id);
int gc_seal_use_key(gc_seal_t *s, uint32_t key_id);
/* Only these senders are accepted (after authentication); n = 0 accepts any. */
int gc_seal_set_nodelist(gc_seal_t *s, const uint32_t *nodes, size_t n);

/* Seal `len` bytes for receiver `to` (0: every member) into `out`; returns the sealed
   length or a negative error. */
long gc_seal_close(gc_seal_t *s, uint32_t to, const uint8_t *in, size_t len, uint8_t *out, size_t cap);
/* Open a datagram into `out`; returns the plain length, or a GC_SEAL_DROP_* reason (counted).
   *sender: who sealed it; *flags: GC_SEAL_NEWEST if no later datagram of its sender was opened. */
long gc_seal_open(gc_seal_t *s, const uint8_t *in, size_t len, uint8_t *out, size_t cap, uint32_t *sender,
                  uint32_t *flags);

/* The newest incarnation known per sender, to keep across restarts ... */
size_t gc_seal_incarnations(gc_seal_t *s, uint32_t *senders, uint64_t *incarnations, size_t cap);
/* ... and to hand back at the next start (before any datagram is opened). */
int gc_seal_remember(gc_seal_t *s, uint32_t sender, uint64_t incarnation);

void gc_seal_get_stats(gc_seal_t *s, gc_seal_stats_t *out);
/* CDEF-END */

#endif /* GROUPCOMM_SEAL_H */
