"""Emulates kernels/flash_attn.cu on the CPU, lane by lane, to check its fragment indexing
without a GPU: every shared-memory read (ldmatrix, with the row address each lane gives),
every mma.sync m16n8k16 operand and accumulator is built exactly as the kernel builds it
(per lane: groupID g = lane / 4, t = lane % 4), using the PTX ISA's definitions:

  mma A (16x16, row): a0,a1 = (g, 2t..2t+1), a2,a3 = (g+8, 2t..), a4,a5 = (g, 2t+8..), a6,a7 = (g+8, 2t+8..)
  mma B (16x8, col):  b0,b1 = (k 2t..2t+1, n g), b2,b3 = (k 2t+8.., n g)
  mma C (16x8, f32):  c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..)
  ldmatrix .x4: lanes 8i..8i+7 address the rows of matrix i; register i of lane l holds
    (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, or with .trans (rows 2(l%4), 2(l%4)+1, col l/4)

and compares outputs, log-sum-exp and gradients with a plain numpy reference (f64), for
GQA, ragged packed segments, a KV-cache offset, left padding and a window. Arithmetic is
f32/f64 (bf16 rounding is not emulated: this checks the indexing, not the precision; the GPU
tests in tests/integration/cuda.rs check both).

    python3 scripts/emulate_flash_attn.py     # needs numpy; prints one line per case
"""
import numpy as np

NEG_INF = -np.inf


def mma(c, a, b):
    """c[32][4] += A·B for per-lane fragments a[32][8] (a0..a7) and b[32][4] (b0..b3)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2] = a[lane][0:2]
        A[g + 8, 2 * t:2 * t + 2] = a[lane][2:4]
        A[g, 2 * t + 8:2 * t + 10] = a[lane][4:6]
        A[g + 8, 2 * t + 8:2 * t + 10] = a[lane][6:8]
        B[2 * t:2 * t + 2, g] = b[lane][0:2]
        B[2 * t + 8:2 * t + 10, g] = b[lane][2:4]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane][0:2] += D[g, 2 * t:2 * t + 2]
        c[lane][2:4] += D[g + 8, 2 * t:2 * t + 2]


def visible(qi, qpos, qseg, j, kpos, kseg, off, window, segs):
    return (qi >= 0 and j <= qi + off and kpos >= 0 and kpos <= qpos
            and (window == 0 or qpos - kpos < window) and (not segs or qseg == kseg))


def ldsm_x4(tile, addr, trans=False):
    """ldmatrix.x4 (.trans): addr(lane) = (row, col) of the 8-element row lane gives; returns
    per lane the 8 values of its 4 registers."""
    regs = [[] for _ in range(32)]
    for i in range(4):
        M = np.array([tile[r, c:c + 8] for r, c in (addr(l) for l in range(8 * i, 8 * i + 8))])
        for l in range(32):
            if trans:
                regs[l] += [M[2 * (l % 4), l // 4], M[2 * (l % 4) + 1, l // 4]]
            else:
                regs[l] += [M[l // 4, 2 * (l % 4)], M[l // 4, 2 * (l % 4) + 1]]
    return regs


# The kernel's operand loaders (frag_a, frag_b_t2, frag_b2, frag_a_t), with its addresses.
def frag_a(tile, r0, c0):
    return ldsm_x4(tile, lambda l: (r0 + l % 16, c0 + (l // 16) * 8))


def frag_b_t2(tile, n0, k0):
    """B of n-tiles n0 and n0+8 (4 values per lane each)."""
    r = ldsm_x4(tile, lambda l: (n0 + l % 8 + (l // 16) * 8, k0 + ((l // 8) % 2) * 8))
    return [x[0:4] for x in r], [x[4:8] for x in r]


def frag_b2(tile, k0, n0):
    r = ldsm_x4(tile, lambda l: (k0 + l % 8 + ((l // 8) % 2) * 8, n0 + (l // 16) * 8), trans=True)
    return [x[0:4] for x in r], [x[4:8] for x in r]


def frag_a_t(tile, k0, m0):
    return ldsm_x4(tile, lambda l: (k0 + l % 8 + ((l // 8) // 2) * 8, m0 + ((l // 8) % 2) * 8), trans=True)


def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, q_kmin, window, scale):
    """flash_fwd<D> over the whole grid. q (b, hq, tq, d), k/v (b, hkv, tk, d)."""
    b_, hq, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    BR, BC = 64, 32
    G = hq // hkv
    off = tk - tq
    segs = q_seg is not None
    scale_log2 = scale * 1.4426950408889634
    o = np.zeros_like(q)
    lse = np.zeros((b_, hq, tq))
    for b in range(b_):
        for kvh in range(hkv):
            for bx in range((G * tq + BR - 1) // BR):
                r0 = bx * BR
                lim0, lim1 = tk, 0
                qs = np.zeros((BR, D))
                for rr in range(BR):
                    r = r0 + rr
                    if r < G * tq:
                        gi, i = r // tq, r % tq
                        qs[rr] = q[b, kvh * G + gi, i]
                        lim0 = min(lim0, q_kmin[b][i] if q_kmin is not None else 0)
                        lim1 = max(lim1, min(i + off + 1, tk))
                # per warp, per lane state
                acc = np.zeros((4, 32, D // 8, 4))
                m = np.full((4, 32, 2), NEG_INF)
                l = np.zeros((4, 32, 2))
                mr = {}
                for w in range(4):
                    for lane in range(32):
                        g = lane // 4
                        for e in range(2):
                            r = r0 + w * 16 + g + e * 8
                            if r < G * tq:
                                i = r % tq
                                mr[w, lane, e] = (i, q_pos[b][i], q_seg[b][i] if segs else 0)
                            else:
                                mr[w, lane, e] = (-1, -1, 0)
                kstart = (lim0 // BC) * BC
                for j0 in range(kstart, lim1, BC):
                    ks = np.zeros((BC, D))
                    vs = np.zeros((BC, D))
                    kp = np.full(BC, -1)
                    kg = np.zeros(BC, dtype=int)
                    for jj in range(BC):
                        j = j0 + jj
                        if j < tk:
                            ks[jj] = k[b, kvh, j]
                            vs[jj] = v[b, kvh, j]
                            kp[jj] = k_pos[b][j]
                            kg[jj] = k_seg[b][j] if segs else 0
                    for w in range(4):
                        s = np.zeros((32, BC // 8, 4))
                        for kt in range(D // 16):
                            a = frag_a(qs, w * 16, kt * 16)
                            for n in range(0, BC // 8, 2):
                                b0, b1 = frag_b_t2(ks, n * 8, kt * 16)
                                mma(s[:, n, :], a, b0)
                                mma(s[:, n + 1, :], a, b1)
                        mx = np.full((32, 2), NEG_INF)
                        for lane in range(32):
                            t = lane % 4
                            for n in range(BC // 8):
                                for cc in range(4):
                                    e, col = cc // 2, n * 8 + 2 * t + (cc & 1)
                                    qi, qp, qg = mr[w, lane, e]
                                    ok = visible(qi, qp, qg, j0 + col, kp[col], kg[col], off, window, segs)
                                    s[lane, n, cc] = s[lane, n, cc] * scale_log2 if ok else NEG_INF
                                    mx[lane, e] = max(mx[lane, e], s[lane, n, cc])
                        # shuffles over the 4 lanes of a group
                        for lane in range(32):
                            grp = [lane ^ x for x in (0, 1, 2, 3)]
                            for e in range(2):
                                mxe = max(mx[x, e] for x in grp)
                                mn = max(m[w, lane, e], mxe)
                                alpha = 1.0 if mn == NEG_INF else 2.0 ** (m[w, lane, e] - mn)
                                m[w, lane, e] = mn
                                l[w, lane, e] *= alpha
                                acc[w, lane, :, 2 * e:2 * e + 2] *= alpha
                        for lane in range(32):
                            for n in range(BC // 8):
                                for cc in range(4):
                                    e = cc // 2
                                    p = 0.0 if s[lane, n, cc] == NEG_INF else 2.0 ** (s[lane, n, cc] - m[w, lane, e])
                                    s[lane, n, cc] = p
                                    l[w, lane, e] += p
                        for kk in range(BC // 16):
                            a = [list(s[lane, 2 * kk, 0:2]) + list(s[lane, 2 * kk, 2:4]) +
                                 list(s[lane, 2 * kk + 1, 0:2]) + list(s[lane, 2 * kk + 1, 2:4]) for lane in range(32)]
                            for n in range(0, D // 8, 2):
                                b0, b1 = frag_b2(vs, kk * 16, n * 8)
                                mma(acc[w, :, n, :], a, b0)
                                mma(acc[w, :, n + 1, :], a, b1)
                for w in range(4):
                    lsum = np.zeros((32, 2))
                    for lane in range(32):
                        grp = [lane ^ x for x in (0, 1, 2, 3)]
                        for e in range(2):
                            lsum[lane, e] = sum(l[w, x, e] for x in grp)
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for e in range(2):
                            r = r0 + w * 16 + g + e * 8
                            i = mr[w, lane, e][0]
                            if i < 0:
                                continue
                            gi, h = r // tq, kvh * G + r // tq
                            inv = 1.0 / lsum[lane, e] if lsum[lane, e] > 0 else 0.0
                            for n in range(D // 8):
                                o[b, h, i, n * 8 + 2 * t] = acc[w, lane, n, 2 * e] * inv
                                o[b, h, i, n * 8 + 2 * t + 1] = acc[w, lane, n, 2 * e + 1] * inv
                            if t == 0:
                                lse[b, h, i] = ((m[w, lane, e] + np.log2(lsum[lane, e])) * 0.6931471805599453
                                                if lsum[lane, e] > 0 else np.inf)
    return o, lse


def backward(q, k, v, do, lse, dvec, q_pos, k_pos, q_seg, k_seg, q_kmin, window, scale):
    """flash_bwd<D> over the whole grid; returns dq, dk, dv in (b, h, t, d)."""
    b_, hq, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    BK, BR = 64, 32
    G = hq // hkv
    off = tk - tq
    segs = q_seg is not None
    scale_log2 = scale * 1.4426950408889634
    dq = np.zeros(q.shape)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    for b in range(b_):
        for kvh in range(hkv):
            for bx in range((tk + BK - 1) // BK):
                j0 = bx * BK
                ks = np.zeros((BK, D))
                vs = np.zeros((BK, D))
                kp = np.full(BK, -1)
                kg = np.zeros(BK, dtype=int)
                for jj in range(BK):
                    j = j0 + jj
                    if j < tk:
                        ks[jj], vs[jj] = k[b, kvh, j], v[b, kvh, j]
                        kp[jj] = k_pos[b][j]
                        kg[jj] = k_seg[b][j] if segs else 0
                dk_acc = np.zeros((4, 32, D // 8, 4))
                dv_acc = np.zeros((4, 32, D // 8, 4))
                jlast = min(j0 + BK, tk) - 1
                istart = max(0, j0 - off)
                for gi in range(G):
                    h = kvh * G + gi
                    for i0 in range((istart // BR) * BR, tq, BR):
                        qi_s = [i0 + x if i0 + x < tq else -1 for x in range(BR)]
                        skip = not any(i >= 0 and (q_kmin is None or q_kmin[b][i] <= jlast) for i in qi_s)
                        if skip:
                            continue
                        qpos_s = [q_pos[b][i] if i >= 0 else -1 for i in qi_s]
                        qseg_s = [(q_seg[b][i] if segs else 0) if i >= 0 else 0 for i in qi_s]
                        lse_s = [lse[b, h, i] * 1.4426950408889634 if i >= 0 else 0.0 for i in qi_s]
                        dvec_s = [dvec[b, h, i] if i >= 0 else 0.0 for i in qi_s]
                        qs = np.zeros((BR, D))
                        dos = np.zeros((BR, D))
                        for x, i in enumerate(qi_s):
                            if i >= 0:
                                qs[x], dos[x] = q[b, h, i], do[b, h, i]
                        dss = np.zeros((BK, BR))
                        for w in range(4):
                            s = np.zeros((32, BR // 8, 4))
                            dp = np.zeros((32, BR // 8, 4))
                            for kt in range(D // 16):
                                ak, av = frag_a(ks, w * 16, kt * 16), frag_a(vs, w * 16, kt * 16)
                                for n in range(0, BR // 8, 2):
                                    bq0, bq1 = frag_b_t2(qs, n * 8, kt * 16)
                                    bd0, bd1 = frag_b_t2(dos, n * 8, kt * 16)
                                    mma(s[:, n, :], ak, bq0)
                                    mma(s[:, n + 1, :], ak, bq1)
                                    mma(dp[:, n, :], av, bd0)
                                    mma(dp[:, n + 1, :], av, bd1)
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                for n in range(BR // 8):
                                    for cc in range(4):
                                        kr, col = w * 16 + g + (cc // 2) * 8, n * 8 + 2 * t + (cc & 1)
                                        ok = visible(qi_s[col], qpos_s[col], qseg_s[col], j0 + kr, kp[kr], kg[kr], off, window, segs)
                                        p = 2.0 ** (s[lane, n, cc] * scale_log2 - lse_s[col]) if ok else 0.0
                                        s[lane, n, cc] = p
                                        dp[lane, n, cc] = p * (dp[lane, n, cc] - dvec_s[col])
                            for kk in range(BR // 16):
                                ap = [list(s[lane, 2 * kk, 0:2]) + list(s[lane, 2 * kk, 2:4]) +
                                      list(s[lane, 2 * kk + 1, 0:2]) + list(s[lane, 2 * kk + 1, 2:4]) for lane in range(32)]
                                as_ = [list(dp[lane, 2 * kk, 0:2]) + list(dp[lane, 2 * kk, 2:4]) +
                                       list(dp[lane, 2 * kk + 1, 0:2]) + list(dp[lane, 2 * kk + 1, 2:4]) for lane in range(32)]
                                for n in range(0, D // 8, 2):
                                    bd0, bd1 = frag_b2(dos, kk * 16, n * 8)
                                    bq0, bq1 = frag_b2(qs, kk * 16, n * 8)
                                    mma(dv_acc[w, :, n, :], ap, bd0)
                                    mma(dv_acc[w, :, n + 1, :], ap, bd1)
                                    mma(dk_acc[w, :, n, :], as_, bq0)
                                    mma(dk_acc[w, :, n + 1, :], as_, bq1)
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                for n in range(BR // 8):
                                    for cc in range(4):
                                        kr, col = w * 16 + g + (cc // 2) * 8, n * 8 + 2 * t + (cc & 1)
                                        dss[kr, col] = dp[lane, n, cc]
                        for w in range(4):
                            mq, n0 = (w % 2) * 16, (w // 2) * (D // 16)
                            dqf = np.zeros((32, D // 16, 4))
                            for kk in range(BK // 16):
                                a = frag_a_t(dss, kk * 16, mq)
                                for n in range(0, D // 16, 2):
                                    b0, b1 = frag_b2(ks, kk * 16, (n0 + n) * 8)
                                    mma(dqf[:, n, :], a, b0)
                                    mma(dqf[:, n + 1, :], a, b1)
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                for e in range(2):
                                    i = qi_s[mq + g + e * 8]
                                    if i < 0:
                                        continue
                                    for n in range(D // 16):
                                        col = (n0 + n) * 8 + 2 * t
                                        dq[b, h, i, col] += dqf[lane, n, 2 * e] * scale
                                        dq[b, h, i, col + 1] += dqf[lane, n, 2 * e + 1] * scale
                for w in range(4):
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for e in range(2):
                            j = j0 + w * 16 + g + e * 8
                            if j >= tk:
                                continue
                            for n in range(D // 8):
                                col = n * 8 + 2 * t
                                dk[b, kvh, j, col:col + 2] = dk_acc[w, lane, n, 2 * e:2 * e + 2] * scale
                                dv[b, kvh, j, col:col + 2] = dv_acc[w, lane, n, 2 * e:2 * e + 2]
    return dq, dk, dv


def reference(q, k, v, do, q_pos, k_pos, q_seg, k_seg, window, scale):
    b_, hq, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    G = hq // hkv
    off = tk - tq
    o = np.zeros_like(q)
    lse = np.full((b_, hq, tq), np.inf)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(b_):
        for h in range(hq):
            kh = h // G
            for i in range(tq):
                vis = np.array([visible(i, q_pos[b][i], q_seg[b][i] if q_seg else 0, j, k_pos[b][j],
                                        k_seg[b][j] if k_seg else 0, off, window, q_seg is not None)
                                for j in range(tk)])
                if not vis.any():
                    continue
                s = q[b, h, i] @ k[b, kh].T * scale
                s[~vis] = -np.inf
                mx = s.max()
                p = np.exp(s - mx)
                z = p.sum()
                p /= z
                o[b, h, i] = p @ v[b, kh]
                lse[b, h, i] = mx + np.log(z)
                dp = v[b, kh] @ do[b, h, i]
                ds = p * (dp - do[b, h, i] @ o[b, h, i])
                dq[b, h, i] = ds @ k[b, kh] * scale
                dk[b, kh] += np.outer(ds, q[b, h, i]) * scale
                dv[b, kh] += np.outer(p, do[b, h, i])
    return o, lse, dq, dk, dv


def case(name, b, hq, hkv, tq, tk, D, pad=None, segs=None, window=0, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, tq, D))
    k = rng.standard_normal((b, hkv, tk, D))
    v = rng.standard_normal((b, hkv, tk, D))
    do = rng.standard_normal((b, hq, tq, D))
    pad = pad or [0] * b
    if segs is not None:  # packed: positions are indices, kmin the segment start
        q_pos = k_pos = [list(range(tk)) for _ in range(b)]
        seg = [[s for s, n in enumerate(row) for _ in range(n)] for row in segs]
        kmin = [[r.index(s) for s in r] for r in seg]
        q_seg = k_seg = seg
    else:
        k_pos = [[-1 if j < pad[r] else j - pad[r] for j in range(tk)] for r in range(b)]
        q_pos = [row[tk - tq:] for row in k_pos]
        q_seg = k_seg = kmin = None
    scale = 1 / np.sqrt(D)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, do, q_pos, k_pos, q_seg, k_seg, window, scale)
    o, lse = forward(q, k, v, q_pos, k_pos, q_seg, k_seg, kmin, window, scale)
    dvec = (do * o).sum(-1)
    dq, dk, dv = backward(q, k, v, do, lse, dvec, q_pos, k_pos, q_seg, k_seg, kmin, window, scale)
    fin = np.isfinite(rl)
    errs = {
        "o": np.abs(o - ro).max(),
        "lse": np.abs(lse[fin] - rl[fin]).max() if fin.any() else 0.0,
        "dq": np.abs(dq - rdq).max(),
        "dk": np.abs(dk - rdk).max(),
        "dv": np.abs(dv - rdv).max(),
    }
    ok = all(e < 1e-9 for e in errs.values()) and np.array_equal(np.isinf(lse), ~fin)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    return ok


if __name__ == "__main__":
    results = [
        case("causal prefill, GQA 2:1, d 64, t 77", 1, 4, 2, 77, 77, 64),
        case("packed ragged segments, GQA 4:1, d 64", 1, 4, 1, 70, 70, 64, segs=[[13, 1, 40, 16]]),
        case("cache offset 40 after 130, left padding, d 128", 2, 2, 1, 40, 170, 128, pad=[5, 33]),
        case("decode, d 64, window 16", 2, 4, 2, 1, 90, 64, pad=[0, 20], window=16),
        case("padding longer than the queries' start, d 64", 2, 2, 2, 50, 50, 64, pad=[0, 10]),
    ]
    raise SystemExit(0 if all(results) else 1)
