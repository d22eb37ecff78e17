/* psp_core.c: the PSP's C fast path (psp_firmware._psp_core_c).
 *
 * Pure functions used by psp_firmware/merkle.py and psp_firmware/psp.py:
 * the merkle chunk/node/root hashes (SHA-256 from OpenSSL's libcrypto),
 * hashing a 512-byte chunk straight from host memory with the A/D bits
 * masked, the leaf-range scan and bulk entry write of an UPDATE_NPT, and the
 * scrub. No Python objects, no policy: every decision stays in the Python
 * firmware (the twin these functions mirror byte for byte). PSP state passed
 * in (shadow pages, child-hash slots, stored hashes) lives in buffers the
 * PSP allocated; host memory is only read (hash, scan) or written where the
 * Python twin writes it (entries, scrub).
 */
#include <stdint.h>
#include <string.h>
#include <openssl/sha.h>

#define CHUNK_BYTES 512
#define SLOT_BYTES  2048            /* 64 child node hashes of 32 bytes */
#define AD_MASK     0x60ULL
#define P_BIT       1ULL
#define PS_BIT      0x80ULL

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* SHA-256("C" || chunk (A/D cleared when mask_ad) || slots[0..2048) if slots) */
void psp_chunk_hash(const uint8_t *src, int mask_ad, const uint8_t *slots, uint8_t *out)
{
    SHA256_CTX c;
    SHA256_Init(&c);
    if (mask_ad) {
        uint8_t buf[1 + CHUNK_BYTES];
        buf[0] = 'C';
        for (int i = 0; i < CHUNK_BYTES; i += 8)
            st64(buf + 1 + i, ld64(src + i) & ~AD_MASK);
        SHA256_Update(&c, buf, sizeof buf);
    } else {
        SHA256_Update(&c, "C", 1);
        SHA256_Update(&c, src, CHUNK_BYTES);
    }
    if (slots)
        SHA256_Update(&c, slots, SLOT_BYTES);
    SHA256_Final(out, &c);
}

/* 1 when psp_chunk_hash(...) equals expected[0..32) */
int psp_chunk_check(const uint8_t *src, int mask_ad, const uint8_t *slots,
                    const uint8_t *expected)
{
    uint8_t h[32];
    psp_chunk_hash(src, mask_ad, slots, h);
    return memcmp(h, expected, 32) == 0;
}

/* SHA-256("N" || hpa (u64 LE) || level (u8) || chunks[0..256)) */
void psp_node_hash(uint64_t hpa, int level, const uint8_t *chunks, uint8_t *out)
{
    uint8_t buf[1 + 8 + 1 + 256];
    buf[0] = 'N';
    st64(buf + 1, hpa);
    buf[9] = (uint8_t)level;
    memcpy(buf + 10, chunks, 256);
    SHA256(buf, sizeof buf, out);
}

/* SHA-256("R" || root (u64 LE) || node[0..32)) */
void psp_root_hash(uint64_t root, const uint8_t *node, uint8_t *out)
{
    uint8_t buf[1 + 8 + 32];
    buf[0] = 'R';
    st64(buf + 1, root);
    memcpy(buf + 9, node, 32);
    SHA256(buf, sizeof buf, out);
}

/* Re-hash chunk j of a page from its shadow and the page's node hash:
 * chunks (256 bytes, the page's 8 chunk hashes) gets chunk j replaced. */
void psp_rehash_chunk_node(const uint8_t *shadow, int j, const uint8_t *slots,
                           uint64_t hpa, int level, uint8_t *chunks, uint8_t *node_out)
{
    psp_chunk_hash(shadow + j * CHUNK_BYTES, 0, slots ? slots + j * SLOT_BYTES : 0,
                   chunks + 32 * j);
    psp_node_hash(hpa, level, chunks, node_out);
}

/* Scrub [off, off+n) of host memory a page at a time, leaving pages that
 * already read as zero untouched (same bytes; avoids dirtying a page the
 * kernel would have to allocate just to write zeros over its zeros). */
void psp_scrub(uint8_t *mem, uint64_t off, uint64_t n)
{
    static const uint8_t zero[4096];
    uint8_t *p = mem + off, *end = p + n;
    while (p < end) {
        uint64_t k = (uint64_t)(end - p) < 4096 ? (uint64_t)(end - p) : 4096;
        if (memcmp(p, zero, k))
            memset(p, 0, k);
        p += k;
    }
}

/* The leaf scan of a one-table plan: entries [idx, idx+n) of a shadow page.
 * Returns -1 if none is present, else (i << 1) | overlap for the first
 * present one at idx+i, overlap set when level 2 and the entry is not PS
 * (a table: RANGE_OVERLAP), as ShadowNpt.plan_map decides. */
int64_t psp_leaf_scan(const uint8_t *shadow, int idx, int n, int level)
{
    for (int i = 0; i < n; i++) {
        uint64_t e = ld64(shadow + 8 * (idx + i));
        if (e & P_BIT)
            return ((int64_t)i << 1) | (level == 2 && !(e & PS_BIT));
    }
    return -1;
}

/* Write n leaves value0 + i*step into entries [idx, idx+n) of a table page in
 * host memory and of its shadow (A/D cleared in the shadow). */
void psp_write_leaves(uint8_t *mem, uint64_t table, uint8_t *shadow, int idx, int n,
                      uint64_t value0, uint64_t step)
{
    for (int i = 0; i < n; i++) {
        uint64_t v = value0 + (uint64_t)i * step;
        st64(mem + table + 8 * (uint64_t)(idx + i), v);
        st64(shadow + 8 * (idx + i), v & ~AD_MASK);
    }
}

/* All 8 chunk hashes of a page (into chunks[0..256)) and its node hash.
 * Chunk j includes slots + j*2048 when bit j of slot_mask is set. */
void psp_page_hash(const uint8_t *page, int mask_ad, const uint8_t *slots, int slot_mask,
                   uint64_t hpa, int level, uint8_t *chunks, uint8_t *node_out)
{
    for (int j = 0; j < 8; j++)
        psp_chunk_hash(page + j * CHUNK_BYTES, mask_ad,
                       (slots && ((slot_mask >> j) & 1)) ? slots + j * SLOT_BYTES : 0,
                       chunks + 32 * j);
    psp_node_hash(hpa, level, chunks, node_out);
}
