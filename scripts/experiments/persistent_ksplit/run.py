"""Experiment (seventeenth session, not in the product): check and time ``step.cu``, a GPT-2 small decode step
(batch 32, head dim 64, fp16 weights and caches; 12 layers, ln_f, LM head, greedy tokens) as one persistent kernel.

Run from the repository root on a GPU machine with 132 multiprocessors (H100 SXM / H200):

    nvcc -arch=sm_90a -O3 -shared -Xcompiler -fPIC -o /tmp/ksplit.so scripts/experiments/persistent_ksplit/step.cu
    KSPLIT_LIB=/tmp/ksplit.so python3 scripts/experiments/persistent_ksplit/run.py [--pos 512] [--reps 300]

Random GPT-2-shaped weights (a fresh seed each run, printed), caches and layer-0 input (with an outlier feature
and a mean offset, against the folded LayerNorm). Checks layer 11's output and this step's cache entries against a
float64 PyTorch reference of the same layers (unfolded LayerNorm), next to the error of the same layers run by
PyTorch in fp16, for full rows and for ragged pads; the greedy tokens must be the float64 argmax or within 3x
PyTorch fp16's logit error of its max. Then times the kernel (CUDA events, medians) against the same step in
PyTorch fp16 (cuBLAS linears, SDPA over the cache, argmax) captured in one CUDA graph, and prints where the
kernel's time goes (%globaltimer at each grid barrier and inside each phase, block 0; every block's time in one
attention phase). ``--no-lm-head`` stops after layer 11.
"""

import argparse
import ctypes
import os
import statistics

import torch
import torch.nn.functional as F

B, HID, NH, HD, FF, QKV, NL, VOCAB = 32, 768, 12, 64, 3072, 2304, 12, 50257


class StepParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("x_in", "x", "kcache", "vcache", "pads")] + [
        ("L", ctypes.c_int), ("pos", ctypes.c_int)] + [
        (n, ctypes.c_void_p) for n in ("wA", "wO", "wD", "wE", "colA", "biasA", "biasO", "colD", "biasD", "biasE",
                                       "accA", "accD", "stats", "times", "sub", "blkt",
                                       "lnf_g", "lnf_b", "wte")] + [("vocab", ctypes.c_int), ("best", ctypes.c_void_p)]


def tiles(w, ks, ns):
    """[K, N] -> [ks * ns, K / ks, N / ns], tile (i, j) at i * ns + j."""
    k, n = w.shape
    return w.reshape(ks, k // ks, ns, n // ns).permute(0, 2, 1, 3).contiguous().reshape(ks * ns, k // ks, n // ns)


def make_model(gen):
    def rnd(*shape, std):
        return torch.randn(*shape, generator=gen, device="cuda") * std
    layers = []
    for _ in range(NL):
        layers.append(dict(
            g1=1 + rnd(HID, std=0.1), b1=rnd(HID, std=0.05), wa=rnd(HID, QKV, std=0.02), ba=rnd(QKV, std=0.02),
            wo=rnd(HID, HID, std=0.02), bo=rnd(HID, std=0.02), g2=1 + rnd(HID, std=0.1), b2=rnd(HID, std=0.05),
            wf=rnd(HID, FF, std=0.02), bf=rnd(FF, std=0.02), wp=rnd(FF, HID, std=0.02), bp=rnd(HID, std=0.02)))
    return layers


def pack(layers, tiling):
    """The kernel's weights: folded LayerNorms, fp16 tiles (``tiling``: K and N slices of c_attn, c_fc, mlp
    c_proj, from the library), fp32 column sums and biases."""
    aks, ans, dks, dns, eks, ens = tiling
    out = {k: [] for k in ("wA", "wO", "wD", "wE", "colA", "biasA", "biasO", "colD", "biasD", "biasE")}
    for p in layers:
        wa = (p["g1"][:, None] * p["wa"]).half()
        wf = (p["g2"][:, None] * p["wf"]).half()
        out["wA"].append(tiles(wa, aks, ans))
        out["wO"].append(p["wo"].half())
        out["wD"].append(tiles(wf, dks, dns))
        out["wE"].append(tiles(p["wp"].half(), eks, ens))
        out["colA"].append(wa.float().sum(0))
        out["biasA"].append(p["b1"] @ p["wa"] + p["ba"])
        out["biasO"].append(p["bo"])
        out["colD"].append(wf.float().sum(0))
        out["biasD"].append(p["b2"] @ p["wf"] + p["bf"])
        out["biasE"].append(p["bp"])
    return {k: torch.stack(v).contiguous() for k, v in out.items()}


def decoder_layer(p, x, attend):
    """One GPT-2 block on x [B, 768] with the layer's parameters ``p``; ``attend(q, k, v)`` (each [B, H, 1, D])
    returns the attention output [B, H, 1, D] over the cache and this step's key."""
    h = F.layer_norm(x, (HID,), p["g1"], p["b1"], 1e-5)
    q, k, v = (t.reshape(B, NH, 1, HD) for t in torch.addmm(p["ba"], h, p["wa"]).split(HID, dim=1))
    x = x + torch.addmm(p["bo"], attend(q, k, v).reshape(B, HID), p["wo"])
    h = F.layer_norm(x, (HID,), p["g2"], p["b2"], 1e-5)
    return x + torch.addmm(p["bp"], F.gelu(torch.addmm(p["bf"], h, p["wf"]), approximate="tanh"), p["wp"])


def reference(layers, x, kc, vc, pads, pos, dtype, head=None):
    """The 12 layers in PyTorch at ``dtype``, attention over keys [pad, pos] per row; the caches are not touched.
    Returns (x after layer 11, new keys [12, B, H, D], new values, logits [B, vocab] or None); ``head`` is
    (ln_f weight, ln_f bias, wte)."""
    x = x.to(dtype)
    keys = torch.arange(pos + 1, device="cuda")
    mask = (keys[None, :] >= pads[:, None].long())[:, None, None, :]   # [B, 1, 1, pos + 1]
    newk, newv = [], []
    for i, p in enumerate(layers):
        def attend(q, k, v):
            newk.append(k[:, :, 0])
            newv.append(v[:, :, 0])
            K = torch.cat([kc[i, :, :, :pos].to(dtype), k], dim=2)
            V = torch.cat([vc[i, :, :, :pos].to(dtype), v], dim=2)
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        x = decoder_layer({k: v.to(dtype) for k, v in p.items()}, x, attend)
    logits = None
    if head is not None:
        g, b, wte = (t.to(dtype) for t in head)
        logits = F.layer_norm(x, (HID,), g, b, 1e-5) @ wte.t()
    return x, torch.stack(newk), torch.stack(newv), logits


def torch_step(layers16, x, kc, vc, pos, head16=None):
    """The same layers as a PyTorch fp16 decode step would run them (full rows, no mask), caches updated in place;
    with ``head16``, ln_f, the LM head and the greedy tokens too."""
    x = x.half()
    for i, p in enumerate(layers16):
        def attend(q, k, v):
            kc[i, :, :, pos:pos + 1] = k
            vc[i, :, :, pos:pos + 1] = v
            return F.scaled_dot_product_attention(q, kc[i, :, :, :pos + 1], vc[i, :, :, :pos + 1])
        x = decoder_layer(p, x, attend)
    if head16 is not None:
        g, b, wte = head16
        return (F.layer_norm(x, (HID,), g, b, 1e-5) @ wte.t()).argmax(-1)
    return x


def median_us(fn, reps):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(10):
        fn()
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1000 for a, b in ev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pos", type=int, default=512)
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-lm-head", action="store_true", help="the 12 layers only (no ln_f, LM head, tokens)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}; {torch.cuda.get_device_name()}; torch {torch.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lib = ctypes.CDLL(os.environ.get("KSPLIT_LIB", "/tmp/ksplit.so"))
    lib.ksplit_step_launch.argtypes = [ctypes.POINTER(StepParams), ctypes.c_int, ctypes.c_void_p]
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    layers = make_model(gen)
    tiling = (ctypes.c_int * 6)()
    lib.ksplit_tiling(tiling)
    packed = pack(layers, list(tiling))
    print("tiling (K x N slices of c_attn, c_fc, mlp c_proj):", list(tiling))
    pos, L = args.pos, args.L
    kc = (torch.randn(NL, B, NH, L, HD, generator=gen, device="cuda")).half()
    vc = (torch.randn(NL, B, NH, L, HD, generator=gen, device="cuda")).half()
    x_in = torch.randn(B, HID, generator=gen, device="cuda") * 0.5
    x_in[:, 7] += 12.0                                         # an outlier feature, as GPT-2's residuals have
    x_in += 0.3                                                # and a mean offset, against the folded LayerNorm
    x = torch.empty_like(x_in)
    lnf_g = 1 + torch.randn(HID, generator=gen, device="cuda") * 0.1
    lnf_b = torch.randn(HID, generator=gen, device="cuda") * 0.05
    wte = (torch.randn(VOCAB, HID, generator=gen, device="cuda") * 0.05).half()
    best = torch.zeros(B, dtype=torch.int64, device="cuda")
    lm = not args.no_lm_head
    head = (lnf_g, lnf_b, wte) if lm else None
    accA = torch.zeros(2, B, QKV, device="cuda")
    accD = torch.zeros(2, B, FF, device="cuda")
    stats = torch.zeros(2, 2, B, 2, device="cuda")
    times = torch.zeros(52, dtype=torch.int64, device="cuda")
    sub = torch.zeros(NL, 20, dtype=torch.int64, device="cuda")
    blkt = torch.zeros(sms, 2, dtype=torch.int64, device="cuda")

    def params(pads, with_times=False):
        pr = StepParams(x_in=x_in.data_ptr(), x=x.data_ptr(), kcache=kc.data_ptr(), vcache=vc.data_ptr(),
                        pads=pads.data_ptr(), L=L, pos=pos, accA=accA.data_ptr(), accD=accD.data_ptr(),
                        stats=stats.data_ptr(), times=times.data_ptr() if with_times else 0,
                        sub=sub.data_ptr() if with_times else 0, blkt=blkt.data_ptr() if with_times else 0,
                        lnf_g=lnf_g.data_ptr() if lm else 0, lnf_b=lnf_b.data_ptr(), wte=wte.data_ptr(), vocab=VOCAB,
                        best=best.data_ptr())
        for k, v in packed.items():
            setattr(pr, k, v.data_ptr())
        return pr

    def launch(pr):
        err = lib.ksplit_step_launch(ctypes.byref(pr), sms, torch.cuda.current_stream().cuda_stream)
        if err != 0:
            raise RuntimeError(f"ksplit_step_launch: cudaError {err}")

    layers64 = [{k: v.double() for k, v in p.items()} for p in layers]
    layers16 = [{k: v.half() for k, v in p.items()} for p in layers]
    for name, pads in (("full rows", torch.zeros(B, dtype=torch.int32, device="cuda")),
                       ("ragged pads U[0, pos - 16)",
                        torch.randint(0, pos - 16, (B,), generator=gen, device="cuda", dtype=torch.int32))):
        launch(params(pads))
        torch.cuda.synchronize()
        ref, rk, rv, lg64 = reference(layers64, x_in, kc, vc, pads, pos, torch.float64, head)
        r16, _, _, lg16 = reference(layers16, x_in, kc, vc, pads, pos, torch.float16, head)
        scale = ref.abs().max().item()
        err = (x.double() - ref).abs().max().item()
        err16 = (r16.double() - ref).abs().max().item()
        errk = (kc[:, :, :, pos].double() - rk).abs().max().item()
        errv = (vc[:, :, :, pos].double() - rv).abs().max().item()
        ok = err <= 2 * err16 + 1e-3 * scale and errk < 2e-2 and errv < 2e-2 and torch.isfinite(x).all().item()
        print(f"{name}: max |x - ref64| {err:.3g} (PyTorch fp16 {err16:.3g}; max |ref| {scale:.3g}); new keys "
              f"{errk:.3g}, values {errv:.3g} -> {'OK' if ok else 'FAIL'}")
        if lm:
            tokens = (0xFFFFFFFF - (best & 0xFFFFFFFF)).long()
            top = lg64.max(-1).values
            mine = lg64.gather(1, tokens[:, None])[:, 0]
            lerr16 = (lg16.double() - lg64).abs().max(-1).values
            near = mine >= top - torch.clamp(3 * lerr16, min=1e-3)
            same = (tokens == lg64.argmax(-1)).sum().item()
            ok_t = bool(near.all().item())
            print(f"  greedy tokens: {same}/{B} equal the float64 argmax, every token within 3x PyTorch fp16's logit "
                  f"error of the max: {'OK' if ok_t else 'FAIL'} (largest gap {(top - mine).max().item():.3g})")
            ok = ok and ok_t
        if not ok:
            raise SystemExit(1)

    full = torch.zeros(B, dtype=torch.int32, device="cuda")
    kt = torch.empty_like(kc)
    vt = torch.empty_like(vc)
    kt.copy_(kc)
    vt.copy_(vc)
    head16 = (lnf_g.half(), lnf_b.half(), wte) if lm else None
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            torch_step(layers16, x_in, kt, vt, pos, head16)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        torch_step(layers16, x_in, kt, vt, pos, head16)
    nbytes = 2 * NL * B * NH * (pos + 1) * HD * 2 + sum(packed[k].numel() * 2 for k in ("wA", "wO", "wD", "wE"))
    nbytes += wte.numel() * 2 if lm else 0
    what = "12 layers, ln_f, LM head, greedy tokens" if lm else "12 layers"
    print(f"{what}, batch 32, past {pos} (full rows), {nbytes / 1e6:.0f} MB read; medians of {args.reps} calls "
          f"(us), CUDA events around each, alternating:")
    pr = params(full)
    for rnd in range(3):
        us = median_us(lambda: launch(pr), args.reps)
        ref_us = median_us(g.replay, args.reps)
        print(f"  round {rnd + 1}: persistent kernel {us:.1f} ({nbytes / us / 1e6:.2f} TB/s); the same in PyTorch fp16 "
              f"as one CUDA graph {ref_us:.1f} ({ref_us / us:.2f}x)")

    launch(params(full, with_times=True))
    torch.cuda.synchronize()
    t = times.tolist()
    nb = 48 if lm else 47   # barriers: A B D E per layer (the last E's only before the LM head)
    d = [(b - a) / 1000 for a, b in zip(t[:nb], t[1:nb + 1])]
    names = "ABDE"
    per = {n: [] for n in names}
    for i, v in enumerate(d):
        per[names[i % 4]].append(v)
    print("per phase (us, block 0's view, barrier to barrier, one call): " + "; ".join(
        f"{n} total {sum(v):.1f} (median {statistics.median(v):.2f})" for n, v in per.items())
        + (f"; F (ln_f, LM head, tokens) {(t[49] - t[48]) / 1000:.1f}; whole call {(t[49] - t[0]) / 1000:.1f}"
           if lm else ""))
    bt = blkt.tolist()
    dur = sorted(((b - a) / 1000, i) for i, (a, b) in enumerate(bt))
    t5 = min(a for a, _ in bt)
    print("layer 5 attention phase per block (us): min %.2f median %.2f max %.2f; slowest blocks %s; their start "
          "offsets %s" % (dur[0][0], dur[len(dur) // 2][0], dur[-1][0], [i for _, i in dur[-6:]],
                          [round((bt[i][0] - t5) / 1000, 2) for _, i in dur[-6:]]))
    sb = sub.tolist()
    # inside phase X of layer l (block 0): start = the barrier before it (times), then sub stamps
    starts = {"A": [t[0]] + [t[4 * l] for l in range(1, NL)], "B": [t[4 * l + 1] for l in range(NL)],
              "D": [t[4 * l + 2] for l in range(NL)], "E": [t[4 * l + 3] for l in range(NL)]}
    for name, cols, labels in (("A", (0, 1, 2, 3), "load x, wait tile, mma, atomics"),
                               ("B", (4, 5, 6, 7, 8), "zero, q k v, keys, combine, c_proj"),
                               ("D", (10, 11, 12, 13), "load x, wait tile, mma, atomics"),
                               ("E", (15, 16, 17, 18), "load + GELU, wait tile, mma, atomics")):
        steps = []
        for l in range(NL):
            prev = starts[name][l]
            row = []
            for c in cols:
                row.append((sb[l][c] - prev) / 1000)
                prev = sb[l][c]
            steps.append(row)
        med = [statistics.median(r[i] for r in steps) for i in range(len(cols))]
        print(f"  {name} ({labels}): medians " + " / ".join(f"{m:.2f}" for m in med) + " us")


if __name__ == "__main__":
    main()
