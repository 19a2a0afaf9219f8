/*
 * groupcomm/_seal.c -- sealed datagrams: AES-256-GCM under per-sender
 * subkeys derived from the cluster key, with replay protection.
 * The format and the reasoning are in _seal.h.
 */
#include "_seal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/kdf.h>

#define MAGIC0 'G'
#define MAGIC1 'S'
#define SEAL_VERSION GC_SEAL_VERSION
#define AUTH_ONLY_BIT 0x80u
#define EPOCH_BYTES (1ull << 34) /* bytes under one subkey before the sender moves on */
#define WINDOW_WORDS (GC_SEAL_WINDOW / 64)
#define INNER_SENDER_OFFSET 8    /* sender of ring, FD and UNICAST datagrams (wire.py SENDER) */

static const char HKDF_SALT[] = "groupcomm-seal-v2";

typedef struct {
    int used;
    uint32_t id;
    uint8_t key[GC_SEAL_KEY_BYTES];
} cluster_key_t;

typedef struct {                 /* one derived subkey, ready in its own cipher context */
    int valid;
    uint32_t key_id;
    uint64_t epoch;
    EVP_CIPHER_CTX *ctx;
} subkey_t;

typedef struct {
    uint32_t node;
    uint64_t incarnation;
    uint64_t highest;            /* highest counter accepted (0: none yet) */
    uint64_t window[WINDOW_WORDS];   /* bit (c % GC_SEAL_WINDOW) set: counter c seen */
    uint64_t last_used;          /* for eviction: the context's open count when last heard */
    subkey_t slots[2];           /* the subkeys in use: rotations and epochs overlap briefly */
} peer_t;

struct gc_seal {
    pthread_mutex_t mu;
    uint32_t cluster_id, node_id;
    uint64_t incarnation;
    int auth_only;
    cluster_key_t keys[GC_SEAL_KEYS_MAX];
    int send_key;                /* index into keys, -1: none */
    /* sending */
    uint64_t counter, epoch_bytes;
    subkey_t tx;
    /* receiving */
    peer_t *peers;
    uint32_t n_peers, max_peers;
    uint32_t *nodelist;
    size_t n_nodelist;
    EVP_CIPHER_CTX *scratch;     /* a trial subkey for a claim not seen yet */
    double budget, budget_max;   /* derivations that may still fail this second */
    uint64_t budget_at_ns;
    gc_seal_stats_t stats;
};

static void put_u32(uint8_t *b, uint32_t v) { b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v; }
static void put_u64(uint8_t *b, uint64_t v) { put_u32(b, (uint32_t)(v >> 32)); put_u32(b + 4, (uint32_t)v); }
static uint32_t get_u32(const uint8_t *b)
{
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}
static uint64_t get_u64(const uint8_t *b) { return ((uint64_t)get_u32(b) << 32) | get_u32(b + 4); }

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int find_key(const gc_seal_t *s, uint32_t id)
{
    for (int i = 0; i < GC_SEAL_KEYS_MAX; i++)
        if (s->keys[i].used && s->keys[i].id == id) return i;
    return -1;
}

/* HKDF-SHA256 of the cluster key into a subkey for (sender, incarnation, epoch). */
static int derive(const gc_seal_t *s, const uint8_t *cluster_key, uint32_t sender, uint64_t incarnation,
                  uint64_t epoch, uint8_t out[GC_SEAL_KEY_BYTES])
{
    uint8_t info[24];
    put_u32(info, s->cluster_id);
    put_u32(info + 4, sender);
    put_u64(info + 8, incarnation);
    put_u64(info + 16, epoch);
    size_t outlen = GC_SEAL_KEY_BYTES;
    EVP_PKEY_CTX *kdf = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    int ok = kdf != NULL
        && EVP_PKEY_derive_init(kdf) > 0
        && EVP_PKEY_CTX_set_hkdf_md(kdf, EVP_sha256()) > 0
        && EVP_PKEY_CTX_set1_hkdf_salt(kdf, (const unsigned char *)HKDF_SALT, sizeof HKDF_SALT - 1) > 0
        && EVP_PKEY_CTX_set1_hkdf_key(kdf, cluster_key, GC_SEAL_KEY_BYTES) > 0
        && EVP_PKEY_CTX_add1_hkdf_info(kdf, info, sizeof info) > 0
        && EVP_PKEY_derive(kdf, out, &outlen) > 0;
    EVP_PKEY_CTX_free(kdf);
    return ok ? 0 : GC_SEAL_ECRYPTO;
}

/* Load a freshly derived subkey into a cipher context (encrypt or decrypt). */
static int load_subkey(EVP_CIPHER_CTX *ctx, const uint8_t key[GC_SEAL_KEY_BYTES], int encrypt)
{
    int ok = encrypt ? EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL)
                     : EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL);
    return ok == 1 ? 0 : GC_SEAL_ECRYPTO;
}

static void nonce_for(uint64_t counter, uint8_t iv[12])
{
    memset(iv, 0, 4);
    put_u64(iv + 4, counter);
}

/* ---- context ------------------------------------------------------------ */

int gc_seal_new(uint32_t cluster_id, uint32_t node_id, uint64_t incarnation, int auth_only,
                uint32_t max_peers, uint32_t derive_budget, gc_seal_t **out)
{
    if (out == NULL || max_peers == 0 || derive_budget == 0) return GC_SEAL_EINVAL;
    gc_seal_t *s = calloc(1, sizeof *s);
    if (s == NULL) return GC_SEAL_ECRYPTO;
    s->peers = calloc(max_peers, sizeof *s->peers);
    s->tx.ctx = EVP_CIPHER_CTX_new();
    s->scratch = EVP_CIPHER_CTX_new();
    if (s->peers == NULL || s->tx.ctx == NULL || s->scratch == NULL) {
        gc_seal_free(s);
        return GC_SEAL_ECRYPTO;
    }
    pthread_mutex_init(&s->mu, NULL);
    s->cluster_id = cluster_id;
    s->node_id = node_id;
    s->incarnation = incarnation;
    s->auth_only = auth_only != 0;
    s->max_peers = max_peers;
    s->send_key = -1;
    s->budget = s->budget_max = derive_budget;
    s->budget_at_ns = mono_ns();
    *out = s;
    return 0;
}

static void free_slots(peer_t *p)
{
    for (int i = 0; i < 2; i++) {
        EVP_CIPHER_CTX_free(p->slots[i].ctx);
        p->slots[i].ctx = NULL;
        p->slots[i].valid = 0;
    }
}

void gc_seal_free(gc_seal_t *s)
{
    if (s == NULL) return;
    if (s->peers != NULL) {
        for (uint32_t i = 0; i < s->n_peers; i++) free_slots(&s->peers[i]);
        free(s->peers);
    }
    EVP_CIPHER_CTX_free(s->tx.ctx);
    EVP_CIPHER_CTX_free(s->scratch);
    free(s->nodelist);
    memset(s->keys, 0, sizeof s->keys);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

int gc_seal_set_key(gc_seal_t *s, uint32_t key_id, const uint8_t *key, size_t len)
{
    if (s == NULL || key == NULL || len != GC_SEAL_KEY_BYTES || key_id > GC_SEAL_KEY_ID_MAX) return GC_SEAL_EINVAL;
    pthread_mutex_lock(&s->mu);
    int i = find_key(s, key_id), rc = 0;
    if (i < 0) {
        for (i = 0; i < GC_SEAL_KEYS_MAX && s->keys[i].used; i++) {}
    } else if (memcmp(s->keys[i].key, key, GC_SEAL_KEY_BYTES) != 0) {
        rc = GC_SEAL_EINVAL;     /* a key id names one key for good: never reuse it */
    }
    if (rc == 0 && i == GC_SEAL_KEYS_MAX) rc = GC_SEAL_EINVAL;
    if (rc == 0) {
        s->keys[i].used = 1;
        s->keys[i].id = key_id;
        memcpy(s->keys[i].key, key, GC_SEAL_KEY_BYTES);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int gc_seal_forget_key(gc_seal_t *s, uint32_t key_id)
{
    if (s == NULL) return GC_SEAL_EINVAL;
    pthread_mutex_lock(&s->mu);
    int i = find_key(s, key_id), rc = GC_SEAL_EINVAL;
    if (i >= 0 && i != s->send_key) {
        memset(&s->keys[i], 0, sizeof s->keys[i]);
        for (uint32_t p = 0; p < s->n_peers; p++)     /* its subkeys go too */
            for (int k = 0; k < 2; k++)
                if (s->peers[p].slots[k].key_id == key_id) s->peers[p].slots[k].valid = 0;
        rc = 0;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int gc_seal_use_key(gc_seal_t *s, uint32_t key_id)
{
    if (s == NULL) return GC_SEAL_EINVAL;
    pthread_mutex_lock(&s->mu);
    int i = find_key(s, key_id), rc = GC_SEAL_EINVAL;
    if (i >= 0) {
        if (i != s->send_key) s->tx.valid = 0;     /* derive again under the new key */
        s->send_key = i;
        rc = 0;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int gc_seal_set_nodelist(gc_seal_t *s, const uint32_t *nodes, size_t n)
{
    if (s == NULL || (n > 0 && nodes == NULL)) return GC_SEAL_EINVAL;
    uint32_t *copy = NULL;
    if (n > 0) {
        copy = malloc(n * sizeof *copy);
        if (copy == NULL) return GC_SEAL_ECRYPTO;
        memcpy(copy, nodes, n * sizeof *copy);
    }
    pthread_mutex_lock(&s->mu);
    free(s->nodelist);
    s->nodelist = copy;
    s->n_nodelist = n;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* ---- sealing -------------------------------------------------------------- */

long gc_seal_close(gc_seal_t *s, uint32_t to, const uint8_t *in, size_t len, uint8_t *out, size_t cap)
{
    if (s == NULL || (in == NULL && len > 0) || out == NULL || len > (size_t)INT32_MAX) return GC_SEAL_EINVAL;
    if (cap < len + GC_SEAL_OVERHEAD) return GC_SEAL_DROP_SPACE;
    pthread_mutex_lock(&s->mu);
    long rc;
    if (s->send_key < 0) { rc = GC_SEAL_ENOKEY; goto done; }
    const cluster_key_t *ck = &s->keys[s->send_key];
    uint64_t counter = s->counter + 1;
    uint64_t epoch = counter >> GC_SEAL_EPOCH_SHIFT;
    if (s->tx.valid && epoch == s->tx.epoch && s->epoch_bytes + len > EPOCH_BYTES) {
        epoch += 1;                                 /* enough bytes under this subkey: move on */
        counter = epoch << GC_SEAL_EPOCH_SHIFT;
    }
    if (!s->tx.valid || s->tx.epoch != epoch || s->tx.key_id != ck->id) {
        uint8_t sub[GC_SEAL_KEY_BYTES];
        rc = derive(s, ck->key, s->node_id, s->incarnation, epoch, sub);
        if (rc == 0) rc = load_subkey(s->tx.ctx, sub, 1);
        memset(sub, 0, sizeof sub);
        if (rc != 0) goto done;
        s->stats.derivations++;
        s->tx.valid = 1;
        s->tx.epoch = epoch;
        s->tx.key_id = ck->id;
        s->epoch_bytes = 0;
    }
    s->counter = counter;
    s->epoch_bytes += len;

    out[0] = MAGIC0;
    out[1] = MAGIC1;
    out[2] = SEAL_VERSION;
    out[3] = (uint8_t)(ck->id | (s->auth_only ? AUTH_ONLY_BIT : 0));
    put_u32(out + 4, s->node_id);
    put_u64(out + 8, s->incarnation);
    put_u64(out + 16, counter);
    put_u32(out + 24, to);
    uint8_t iv[12];
    nonce_for(counter, iv);
    EVP_CIPHER_CTX *ctx = s->tx.ctx;
    int n = 0, ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) == 1
        && EVP_EncryptUpdate(ctx, NULL, &n, out, GC_SEAL_HEADER) == 1;
    if (ok && s->auth_only) {
        ok = len == 0 || EVP_EncryptUpdate(ctx, NULL, &n, in, (int)len) == 1;
        if (len > 0) memmove(out + GC_SEAL_HEADER, in, len);
    } else if (ok && len > 0) {
        ok = EVP_EncryptUpdate(ctx, out + GC_SEAL_HEADER, &n, in, (int)len) == 1;
    }
    ok = ok && EVP_EncryptFinal_ex(ctx, out + GC_SEAL_HEADER + len, &n) == 1
        && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, GC_SEAL_TAG, out + GC_SEAL_HEADER + len) == 1;
    if (!ok) { rc = GC_SEAL_ECRYPTO; goto done; }
    s->stats.sealed++;
    rc = (long)(len + GC_SEAL_OVERHEAD);
done:
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* ---- opening -------------------------------------------------------------- */

static peer_t *find_peer(gc_seal_t *s, uint32_t node)
{
    for (uint32_t i = 0; i < s->n_peers; i++)
        if (s->peers[i].node == node) return &s->peers[i];
    return NULL;
}

static int in_nodelist(const gc_seal_t *s, uint32_t node)
{
    if (s->n_nodelist == 0) return 1;
    for (size_t i = 0; i < s->n_nodelist; i++)
        if (s->nodelist[i] == node) return 1;
    return 0;
}

/* May a subkey be derived for a claim that may be forged?  Refills the budget. */
static int budget_allows(gc_seal_t *s)
{
    uint64_t now = mono_ns();
    s->budget += (double)(now - s->budget_at_ns) * s->budget_max / 1e9;
    if (s->budget > s->budget_max) s->budget = s->budget_max;
    s->budget_at_ns = now;
    return s->budget >= 1.0;
}

/* Is counter c new for this peer (not seen, not below the window)? */
static int fresh(const peer_t *p, uint64_t c)
{
    if (c > p->highest) return 1;
    if (p->highest - c >= GC_SEAL_WINDOW) return 0;
    return !((p->window[(c % GC_SEAL_WINDOW) / 64] >> (c % 64)) & 1);
}

static void mark_seen(peer_t *p, uint64_t c)
{
    if (c > p->highest) {
        uint64_t shift = c - p->highest;
        if (p->highest == 0 || shift >= GC_SEAL_WINDOW) {
            memset(p->window, 0, sizeof p->window);
        } else {
            for (uint64_t k = p->highest + 1; k < c; k++)      /* counters skipped: not seen */
                p->window[(k % GC_SEAL_WINDOW) / 64] &= ~(1ull << (k % 64));
        }
        p->highest = c;
    }
    p->window[(c % GC_SEAL_WINDOW) / 64] |= 1ull << (c % 64);
}

/* Decrypt/verify with a ready context; 0 when the tag matches. */
static int try_open(EVP_CIPHER_CTX *ctx, const uint8_t *in, size_t body, int auth_only, uint64_t counter,
                    uint8_t *out)
{
    uint8_t iv[12], tag[GC_SEAL_TAG];
    nonce_for(counter, iv);
    memcpy(tag, in + GC_SEAL_HEADER + body, GC_SEAL_TAG);
    int n = 0, ok = EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, iv) == 1
        && EVP_DecryptUpdate(ctx, NULL, &n, in, GC_SEAL_HEADER) == 1;
    if (ok && auth_only) {
        ok = body == 0 || EVP_DecryptUpdate(ctx, NULL, &n, in + GC_SEAL_HEADER, (int)body) == 1;
    } else if (ok && body > 0) {
        ok = EVP_DecryptUpdate(ctx, out, &n, in + GC_SEAL_HEADER, (int)body) == 1;
    }
    ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, GC_SEAL_TAG, tag) == 1
        && EVP_DecryptFinal_ex(ctx, out + body, &n) == 1;
    if (ok && auth_only && body > 0) memmove(out, in + GC_SEAL_HEADER, body);
    return ok ? 0 : -1;
}

/* Make room for a new peer entry: the one heard from least recently goes. */
static peer_t *new_peer(gc_seal_t *s, uint32_t node)
{
    peer_t *p;
    if (s->n_peers < s->max_peers) {
        p = &s->peers[s->n_peers++];
    } else {
        p = &s->peers[0];
        for (uint32_t i = 1; i < s->n_peers; i++)
            if (s->peers[i].last_used < p->last_used) p = &s->peers[i];
        free_slots(p);
        s->stats.peers_evicted++;
    }
    memset(p, 0, sizeof *p);
    p->node = node;
    return p;
}

static subkey_t *slot_for(peer_t *p, uint32_t key_id, uint64_t epoch)
{
    for (int i = 0; i < 2; i++)
        if (p->slots[i].valid && p->slots[i].key_id == key_id && p->slots[i].epoch == epoch) return &p->slots[i];
    return NULL;
}

long gc_seal_open(gc_seal_t *s, const uint8_t *in, size_t len, uint8_t *out, size_t cap, uint32_t *sender,
                  uint32_t *flags)
{
    if (s == NULL || in == NULL || out == NULL) return GC_SEAL_EINVAL;
    pthread_mutex_lock(&s->mu);
    long rc;
    gc_seal_stats_t *st = &s->stats;
    if (len < 2 || in[0] != MAGIC0 || in[1] != MAGIC1) { st->drop_unsealed++; rc = GC_SEAL_DROP_UNSEALED; goto done; }
    if (len < GC_SEAL_OVERHEAD) { st->drop_short++; rc = GC_SEAL_DROP_SHORT; goto done; }
    if (in[2] != SEAL_VERSION) { st->drop_version++; rc = GC_SEAL_DROP_VERSION; goto done; }
    size_t body = len - GC_SEAL_OVERHEAD;
    if (cap < body) { rc = GC_SEAL_DROP_SPACE; goto done; }
    uint32_t key_id = in[3] & ~AUTH_ONLY_BIT;
    int auth_only = (in[3] & AUTH_ONLY_BIT) != 0;
    uint32_t node = get_u32(in + 4);
    uint64_t incarnation = get_u64(in + 8), counter = get_u64(in + 16);
    uint64_t epoch = counter >> GC_SEAL_EPOCH_SHIFT;
    if (node == s->node_id) { st->drop_self++; rc = GC_SEAL_DROP_SELF; goto done; }
    uint32_t to = get_u32(in + 24);
    if (to != 0 && to != s->node_id) { st->drop_misdirected++; rc = GC_SEAL_DROP_MISDIRECTED; goto done; }
    int k = find_key(s, key_id);
    if (k < 0) { st->drop_key++; rc = GC_SEAL_DROP_KEY; goto done; }
    if (!in_nodelist(s, node)) { st->drop_nodelist++; rc = GC_SEAL_DROP_NODELIST; goto done; }
    if (counter == 0) { st->drop_auth++; rc = GC_SEAL_DROP_AUTH; goto done; }   /* never sealed */

    peer_t *p = find_peer(s, node);
    if (p != NULL && incarnation < p->incarnation) { st->drop_stale++; rc = GC_SEAL_DROP_STALE; goto done; }
    int same_incarnation = p != NULL && incarnation == p->incarnation;
    if (same_incarnation && !fresh(p, counter)) { st->drop_replay++; rc = GC_SEAL_DROP_REPLAY; goto done; }

    subkey_t *slot = same_incarnation ? slot_for(p, key_id, epoch) : NULL;
    if (slot != NULL) {
        if (try_open(slot->ctx, in, body, auth_only, counter, out) != 0) {
            st->drop_auth++; rc = GC_SEAL_DROP_AUTH; goto done;
        }
    } else {
        /* A claim not seen yet: derive its subkey, within the budget for claims that fail. */
        if (!budget_allows(s)) { st->drop_rate++; rc = GC_SEAL_DROP_RATE; goto done; }
        uint8_t sub[GC_SEAL_KEY_BYTES];
        rc = derive(s, s->keys[k].key, node, incarnation, epoch, sub);
        if (rc == 0) rc = load_subkey(s->scratch, sub, 0);
        if (rc != 0) { memset(sub, 0, sizeof sub); goto done; }
        st->derivations++;
        if (try_open(s->scratch, in, body, auth_only, counter, out) != 0) {
            memset(sub, 0, sizeof sub);
            s->budget -= 1.0;
            st->drop_auth++; rc = GC_SEAL_DROP_AUTH; goto done;
        }
        /* Authentic: now it may change state. */
        if (!same_incarnation) {
            if (p == NULL) p = new_peer(s, node);
            else { free_slots(p); memset(p->window, 0, sizeof p->window); p->highest = 0; }
            p->incarnation = incarnation;
            st->new_incarnations++;
        }
        subkey_t *victim = !p->slots[0].valid ? &p->slots[0] : !p->slots[1].valid ? &p->slots[1]
            : (p->slots[0].epoch <= p->slots[1].epoch ? &p->slots[0] : &p->slots[1]);
        if (victim->ctx == NULL) victim->ctx = EVP_CIPHER_CTX_new();
        rc = victim->ctx != NULL ? load_subkey(victim->ctx, sub, 0) : GC_SEAL_ECRYPTO;
        memset(sub, 0, sizeof sub);
        victim->valid = rc == 0;
        victim->key_id = key_id;
        victim->epoch = epoch;
        if (rc != 0) goto done;
    }
    if (body >= INNER_SENDER_OFFSET + 4 && out[0] == 'G' && out[1] != 'P'
            && get_u32(out + INNER_SENDER_OFFSET) != node) {
        st->drop_sender++; rc = GC_SEAL_DROP_SENDER; goto done;
    }
    if (flags != NULL) *flags = counter > p->highest ? GC_SEAL_NEWEST : 0;
    mark_seen(p, counter);
    p->last_used = ++st->opened;
    if (sender != NULL) *sender = node;
    rc = (long)body;
done:
    st->peers = s->n_peers;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* ---- what outlives a restart -------------------------------------------- */

size_t gc_seal_incarnations(gc_seal_t *s, uint32_t *senders, uint64_t *incarnations, size_t cap)
{
    if (s == NULL) return 0;
    pthread_mutex_lock(&s->mu);
    size_t n = 0;
    for (uint32_t i = 0; i < s->n_peers && n < cap; i++, n++) {
        senders[n] = s->peers[i].node;
        incarnations[n] = s->peers[i].incarnation;
    }
    pthread_mutex_unlock(&s->mu);
    return n;
}

int gc_seal_remember(gc_seal_t *s, uint32_t sender, uint64_t incarnation)
{
    if (s == NULL) return GC_SEAL_EINVAL;
    pthread_mutex_lock(&s->mu);
    peer_t *p = find_peer(s, sender);
    if (p == NULL) {
        p = new_peer(s, sender);
        p->incarnation = incarnation;
    } else if (incarnation > p->incarnation) {
        free_slots(p);
        memset(p->window, 0, sizeof p->window);
        p->highest = 0;
        p->incarnation = incarnation;
    }
    s->stats.peers = s->n_peers;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void gc_seal_get_stats(gc_seal_t *s, gc_seal_stats_t *out)
{
    if (s == NULL || out == NULL) return;
    pthread_mutex_lock(&s->mu);
    *out = s->stats;
    out->peers = s->n_peers;
    pthread_mutex_unlock(&s->mu);
}
