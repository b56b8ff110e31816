"""Model-level benchmark: tokens/s of a training step and of ``generate``, and peak memory.

``python -m kphi3_bench.model_bench`` (or ``kphi3-bench model``). Variants, same sizes:

- ``kphi3-triton``: ``KPhi3ForCausalLM`` with ``kernel_backend="triton"`` (the fused kernels;
  CUDA only, "needs a GPU" elsewhere);
- ``kphi3-fused``: the same with ``fused_decoder=True`` (the fused MLP tail, the norm heads and
  the residual adds inside them; CUDA only, "needs a GPU" elsewhere);
- ``kphi3-torch``: the same model on the PyTorch reference backend (``kernel_backend="torch"``);
- ``phi3-dense``: transformers' ``Phi3ForCausalLM`` with the same hidden, intermediate, heads,
  layers and vocabulary: what the grouped projections replace.

With ``--compile`` each chosen variant also runs compiled (``<variant>+compile``, or name them in
``--variants``): ``torch.compile(model, fullgraph=True)`` of the whole model for the training step,
and transformers' own compile path for ``generate`` (static cache, the decoding step compiled with
``CompileConfig(fullgraph=True)``). ``--compile-backend`` picks the compiler (default ``inductor``).
A compiled row's first call (``first call s``, compile included) is recorded next to its steady
time, and its logits must equal the same model's eager logits on the training batch (relative error
under 1e-5 in fp32, 1e-2 in fp16 / bf16) before it is timed.

A training step is forward + backward + ``AdamW.step()`` on ``batch x seq`` tokens; ``generate``
is greedy decoding of exactly ``new_tokens`` tokens after a ``prompt``-token prompt (prefill
included). Before timing, each KPhi-3 variant's logits are compared with a float64 copy of the
model on the torch backend; a kernel variant whose error exceeds twice the torch backend's own
error in the same dtype (or 1e-5) is not timed.

Memory: ``state MB`` is the bytes of the weights and AdamW's state (summed from the tensors);
``peak MB`` is the peak allocated during one step or one ``generate`` above what was allocated
before it (CUDA: ``max_memory_allocated``; CPU: torch.profiler's allocation events).
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import env, memory, report, shapes
from .parity import rel_err
from .progress import Progress
from . import cli
from .cli import MODEL_DEFAULT_SIZES, UsageError, build_model_parser, parse, resolve_device
from .timing import quantiles_ms

VARIANTS = ("kphi3-triton", "kphi3-fused", "kphi3-torch", "phi3-dense")
COMPILED = "+compile"  # suffix of a compiled variant: "kphi3-torch+compile"
ALL_VARIANTS = VARIANTS + tuple(v + COMPILED for v in VARIANTS)
TASKS = ("train", "generate")
# Compiled vs eager logits of the same model (only fusion and ordering change).
COMPILE_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}


def base_variant(variant: str) -> str:
    """The eager variant a (possibly compiled) variant runs: ``kphi3-torch+compile -> kphi3-torch``."""
    return variant[: -len(COMPILED)] if variant.endswith(COMPILED) else variant


def is_compiled(variant: str) -> bool:
    return variant.endswith(COMPILED)


@dataclass(frozen=True)
class ModelFamily:
    hidden: int
    intermediate: int
    min_channels_per_group: int
    heads: int
    vocab: int = 32064
    pad_token_id: int = 32000  # also the EOS token, as in the released config


def _family(name: str, heads: int) -> ModelFamily:
    f = shapes.FAMILIES[name]
    return ModelFamily(f.hidden, f.intermediate, f.min_channels_per_group, heads)


# The released config.json (src/config.json of the original): 20 heads of 64; Phi-3-mini: 32
# heads of 96.
MODEL_FAMILIES: Dict[str, ModelFamily] = {"kphi3": _family("kphi3", 20),
                                          "phi3-mini": _family("phi3-mini", 32)}
MODEL_UNAVAILABLE = ("kphi3_model is not importable ({error}); the model benchmark needs the "
                     "kphi3_model package next to kphi3_kernels")


@dataclass
class ModelSizes:
    family: str
    layers: int
    batch: int
    seq: int
    gen_batch: int
    prompt: int
    new_tokens: int
    steps: int


@dataclass
class ModelRow:
    variant: str
    task: str
    family: str
    dtype: str
    status: str
    tokens_per_s: Optional[float] = None
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    tokens: int = 0
    speedup_vs_dense: Optional[float] = None
    first_call_s: Optional[float] = None  # the first (warm-up) call; for compiled rows: compile included
    compile_backend: str = ""
    params: int = 0
    state_mb: Optional[float] = None
    peak_mb: Optional[float] = None
    parity: str = ""
    error: str = ""
    shape: str = ""
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in ("parity failed", "error")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("env"))
        return d


def _model_classes():
    """(KPhi3Config, KPhi3ForCausalLM); a RuntimeError with a clear message when missing."""
    try:
        from kphi3_model import KPhi3Config, KPhi3ForCausalLM
    except Exception as err:  # missing, or broken at import
        raise RuntimeError(MODEL_UNAVAILABLE.format(error=f"{type(err).__name__}: {err}")) from err
    return KPhi3Config, KPhi3ForCausalLM


def build_model(variant: str, sizes: ModelSizes, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> torch.nn.Module:
    family = MODEL_FAMILIES[sizes.family]
    common = dict(vocab_size=family.vocab, hidden_size=family.hidden,
                  intermediate_size=family.intermediate, num_hidden_layers=sizes.layers,
                  num_attention_heads=family.heads, num_key_value_heads=family.heads,
                  max_position_embeddings=4096, pad_token_id=family.pad_token_id,
                  eos_token_id=family.pad_token_id, bos_token_id=1)
    torch.manual_seed(seed)
    variant = base_variant(variant)
    if variant == "phi3-dense":
        from transformers import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**common))
    else:
        KPhi3Config, KPhi3ForCausalLM = _model_classes()
        fused = variant == "kphi3-fused"
        backend = "triton" if fused else variant.split("-", 1)[1]
        model = KPhi3ForCausalLM(KPhi3Config(
            embed_size=family.hidden, min_channels_per_group=family.min_channels_per_group,
            kernel_backend=backend, fused_decoder=fused, **common))
    return model.to(device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
               first_call: Optional[list] = None):
    """Wall clock per call (synchronized on CUDA), warm-up excluded: (median, p20, p80) in ms.

    ``first_call``: a list to append the first warm-up call's wall time to, in seconds.
    """
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        _sync(device)
        if i == 0 and first_call is not None:
            first_call.append(time.perf_counter() - start)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return quantiles_ms(samples)


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def check_logits(model, oracle_logits: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return rel_err(model(input_ids=ids).logits, oracle_logits)


class ModelBench:
    def __init__(self, sizes: ModelSizes, dtype: torch.dtype, device: torch.device,
                 variants: Sequence[str], progress: Progress, seed: int = 0,
                 compile_backend: str = "inductor"):
        self.sizes, self.dtype, self.device, self.variants = sizes, dtype, device, variants
        self.progress, self.seed, self.compile_backend = progress, seed, compile_backend
        self.info = env.environment(device)
        self.rows: List[ModelRow] = []
        g = torch.Generator().manual_seed(seed)
        self.family = MODEL_FAMILIES[sizes.family]
        high = self.family.pad_token_id  # ordinary tokens only: no pad/EOS in the inputs
        self.train_ids = torch.randint(0, high, (sizes.batch, sizes.seq), generator=g).to(device)
        self.prompt = torch.randint(0, high, (sizes.gen_batch, sizes.prompt), generator=g).to(device)
        self._oracle = None  # (ids, float64 logits, the torch backend's error in self.dtype)
        self._compiled_check = None  # (ok, description) of the compiled variant being run
        self.on_row: Optional[Callable[[List[ModelRow]], None]] = None  # e.g. rewrite --out

    def _row(self, variant: str, task: str, status: str, **kw) -> ModelRow:
        s = self.sizes
        shape = (f"layers={s.layers} batch={s.batch} seq={s.seq}" if task == "train" else
                 f"layers={s.layers} batch={s.gen_batch} prompt={s.prompt} new={s.new_tokens}")
        row = ModelRow(variant=variant, task=task, family=s.family, dtype=shapes.dtype_name(self.dtype),
                       status=status, shape=shape,
                       compile_backend=self.compile_backend if is_compiled(variant) else "",
                       env=env.row_env(self.info), **kw)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(self.rows)
        return row

    def oracle(self):
        """The float64 torch-backend model's logits, and the torch backend's own error in dtype."""
        if self._oracle is None:
            ids = self.train_ids[:1, : min(self.sizes.seq, 64)]
            model = build_model("kphi3-torch", self.sizes, torch.float64, self.device, self.seed)
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            del model
            model = build_model("kphi3-torch", self.sizes, self.dtype, self.device, self.seed)
            self._oracle = (ids, logits, check_logits(model, logits, ids))
            del model
        return self._oracle

    def parity(self, variant: str, model) -> tuple:
        """(ok or None when there is nothing to compare, description)."""
        variant = base_variant(variant)  # compiled rows: the eager model first, then compiled vs eager
        if variant == "phi3-dense":
            return None, "n/a (dense baseline)"
        ids, logits, torch_err = self.oracle()
        err = check_logits(model, logits, ids)
        if variant == "kphi3-torch":
            return True, f"ok (logits rel err {err:.1e} vs float64; the reference)"
        limit = max(2 * torch_err, 1e-5)
        verdict = "ok" if err <= limit else "FAILED"
        return err <= limit, (f"{verdict} (logits rel err {err:.1e} vs float64; limit {limit:.1e} = "
                              f"2x the torch backend's {torch_err:.1e})")

    def run(self) -> List[ModelRow]:
        for variant in self.variants:
            self._run_variant(variant)
        # Eager rows against eager phi3-dense, compiled rows against compiled phi3-dense (when run).
        dense = {(r.task, is_compiled(r.variant)): r.median_ms for r in self.rows
                 if base_variant(r.variant) == "phi3-dense" and r.median_ms}
        for r in self.rows:
            reference = dense.get((r.task, is_compiled(r.variant)))
            if r.median_ms and reference:
                r.speedup_vs_dense = reference / r.median_ms
        return self.rows

    def _run_variant(self, variant: str) -> None:
        if base_variant(variant) in ("kphi3-triton", "kphi3-fused") and self.device.type != "cuda":
            for task in TASKS:  # rows saying why; the progress bar never counted them
                self._row(variant, task, "needs a GPU", parity="not run")
            return
        model = None
        self._compiled_check = None  # (ok, description) of a compiled variant, set by its train task
        try:
            self.progress.step(f"{variant} build + parity")
            model = build_model(variant, self.sizes, self.dtype, self.device, self.seed)
            ok, description = self.parity(variant, model)
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            for task in TASKS:
                self._row(variant, task, "error", error=message, parity="not run")
            self.progress.write(f"ERROR {variant}: {message}")
            self.progress.advance(len(TASKS))
            return
        params = sum(p.numel() for p in model.parameters())
        for task in TASKS:
            self.progress.step(f"{variant} {task}")
            if ok is False:
                self._row(variant, task, "parity failed", parity=description, params=params)
            else:
                try:
                    self._time_task(variant, task, model, description, params)
                except Exception as err:
                    message = f"{type(err).__name__}: {err}"
                    self._row(variant, task, "error", error=message, parity=description,
                              params=params)
                    self.progress.write(f"ERROR {variant} {task}: {message}")
            self.progress.advance()
        del model
        if is_compiled(variant):
            torch._dynamo.reset()  # drop the compiled graphs (and their guards on this model)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def compiled_parity(self, model, compiled, ids) -> tuple:
        """The compiled model's first training call (compile included): (ok, description, seconds)."""
        with torch.no_grad():
            eager = model(input_ids=ids, labels=ids)
        start = time.perf_counter()
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        _sync(self.device)
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        err = max(rel_err(out.logits.detach(), eager.logits), rel_err(out.loss.detach(), eager.loss))
        limit = COMPILE_TOL[shapes.dtype_name(self.dtype)]
        verdict = "ok" if err <= limit else "FAILED"
        return err <= limit, f"{verdict} (compiled vs eager: logits/loss rel err {err:.1e}, limit {limit:.0e})", seconds

    def compile_config(self):
        """transformers' CompileConfig for ``generate``: whole-graph, on any device."""
        from transformers import CompileConfig

        mode = "reduce-overhead" if self.compile_backend == "inductor" and self.device.type == "cuda" else None
        config = CompileConfig(fullgraph=True, backend=self.compile_backend, mode=mode)
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
        return config

    def _time_task(self, variant, task, model, parity_text, params) -> None:
        s, device = self.sizes, self.device
        compiled = is_compiled(variant)
        first_call: list = []
        if task == "train":
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            ids = self.train_ids
            forward = model
            if compiled:
                from .providers import import_inductor_cpu_quietly

                import_inductor_cpu_quietly()  # torch's own deprecation warnings, see there
                forward = torch.compile(model, fullgraph=True, backend=self.compile_backend)
                ok, text, seconds = self.compiled_parity(model, forward, ids)
                parity_text = f"{parity_text}; {text}"
                self._compiled_check = (ok, parity_text)
                if not ok:
                    self._row(variant, task, "parity failed", parity=parity_text, params=params,
                              first_call_s=seconds)
                    return
                first_call.append(seconds)

            def call():
                forward(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            tokens = s.batch * s.seq
            median, p20, p80 = time_calls(call, device, warmup=2, reps=s.steps,
                                          first_call=None if compiled else first_call)
            state = list(model.parameters()) + [
                t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        else:
            model.eval()
            prompt = self.prompt
            extra = dict(cache_implementation="static", compile_config=self.compile_config()) if compiled else {}
            if compiled and self._compiled_check is not None:
                ok, parity_text = self._compiled_check
                if not ok:
                    self._row(variant, task, "parity failed", parity=parity_text, params=params)
                    return

            def call():
                return model.generate(prompt, max_new_tokens=s.new_tokens,
                                      min_new_tokens=s.new_tokens, do_sample=False,
                                      pad_token_id=self.family.pad_token_id, **extra)

            tokens = s.gen_batch * s.new_tokens
            median, p20, p80 = time_calls(call, device, warmup=2 if compiled else 1,
                                          reps=max(2, s.steps // 2), first_call=first_call)
            state = list(model.parameters())
        peak, _ = memory.peak_bytes(call, device)
        self._row(variant, task, "ok", tokens_per_s=tokens / (median * 1e-3), median_ms=median,
                  p20_ms=p20, p80_ms=p80, tokens=tokens, params=params,
                  first_call_s=first_call[0] if first_call else None,
                  state_mb=_tensor_mb(state), peak_mb=None if peak is None else peak / 2 ** 20,
                  parity=parity_text)


def format_table(rows: Sequence[ModelRow], meta: dict) -> str:
    headers = ["variant", "task", "sizes", "tokens/s", "median", "p20-p80", "first call",
               "vs phi3-dense", "params", "state MB", "peak MB", "parity / status"]
    body = []
    for r in rows:
        timed = r.median_ms is not None
        body.append([
            r.variant, r.task, r.shape, report.plain(r.tokens_per_s) if timed else "-",
            report.fmt_time(r.median_ms),
            f"{report.fmt_time(r.p20_ms)}-{report.fmt_time(r.p80_ms)}" if timed else "-",
            report.fmt_time(None if r.first_call_s is None else r.first_call_s * 1e3),
            f"{r.speedup_vs_dense:.2f}x" if r.speedup_vs_dense else "-",
            f"{r.params / 1e6:.1f}M" if r.params else "-",
            report.plain(r.state_mb, 4),
            report.plain(r.peak_mb, 4, none="n/a" if timed else "-"),
            r.parity if r.status == "ok" else (f"{r.status.upper()}: {r.error}" if r.error
                                               else (r.parity if r.failed else r.status)),
        ])
    e = meta["env"]
    head = [f"kphi3-bench model on {e['device_name']} | torch {e['torch']}, transformers "
            f"{e['transformers']} | {e['date']}",
            f"dtype {meta['dtype']}; {meta['family']} sizes, {meta['attention']}; timing: "
            f"{meta['timing']}", f"memory: {meta['memory']}", ""]
    if any(is_compiled(r.variant) for r in rows):
        head.insert(-1, f"compiled rows: {meta.get('compile', '')}; 'vs phi3-dense' compares compiled "
                        "with compiled phi3-dense")
    return "\n".join(report.wrap_lines(head[:-1]) + [""]) + report.render(headers, body,
                                                                         right=range(3, 11))


def _sizes(args: argparse.Namespace, cuda: bool) -> ModelSizes:
    column = 0 if args.quick else (1 if cuda else 2)
    chosen = {name: getattr(args, name) if getattr(args, name) is not None else defaults[column]
              for name, defaults in MODEL_DEFAULT_SIZES.items()}
    return ModelSizes(family=args.family, gen_batch=args.gen_batch, **chosen)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``prog``: how the command was invoked, for the record (``kphi3-bench model`` passes it)."""
    prog = prog or "python -m kphi3_bench.model_bench"
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_model_parser(prog)
    args, status = parse(parser, argv)
    if args is None:
        return status
    try:
        cli.check_model_args(args, tuple(MODEL_FAMILIES))
    except UsageError as err:
        return cli.usage_error(parser, err)
    return run_model(args, argv, prog)


def model_meta(args: argparse.Namespace, argv: Sequence[str], prog: str, bench: "ModelBench",
               sizes: ModelSizes, dtype: torch.dtype, device: torch.device) -> dict:
    return {
        "command": f"{prog} {shlex.join(argv)}".strip(),
        "env": bench.info, "dtype": shapes.dtype_name(dtype), "family": sizes.family,
        "sizes": asdict(sizes),
        "attention": "transformers' default attention implementation (sdpa where supported)",
        "timing": "wall clock per call (CUDA-synchronized), median; warm-up excluded",
        "compile": (f"torch.compile(model, fullgraph=True, backend={args.compile_backend!r}) for "
                    "train; generate: static cache, decoding step compiled by transformers "
                    "(CompileConfig(fullgraph=True)); first call s includes the compile"),
        "memory": "state MB = weights + AdamW state (summed from the tensors); peak MB: "
                  + (memory.CUDA_METHOD if device.type == "cuda" else memory.CPU_METHOD),
    }


def write_model_json(path: str, rows: Sequence[ModelRow], meta: dict, complete: bool = True
                     ) -> None:
    report.write_payload(path, {"schema": "kphi3-bench-model/1", "complete": complete,
                                "meta": meta, "results": [r.to_dict() for r in rows]})


def run_model(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    """The benchmark that ``args`` (parsed by ``cli.build_model_parser`` and checked by
    ``cli.check_model_args``) asks for. ``--out`` is rewritten after every row."""
    parser = build_model_parser(prog)
    try:
        variants = cli.check_model_args(args, tuple(MODEL_FAMILIES))
        device = resolve_device(args.device)
        cuda = device.type == "cuda"
        cli.refuse_gpu_only(variants, named=bool(args.variants), on_cuda=cuda)
        sizes = _sizes(args, cuda)
    except UsageError as err:
        return cli.usage_error(parser, err)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # this run's own bar is the one to read
    dtype = shapes.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    # The bar counts the rows that run: GPU-only variants on a CPU are rows, but not steps.
    runnable = [v for v in variants if cuda or base_variant(v) not in cli.GPU_ONLY_VARIANTS]
    progress = Progress(len(runnable) * len(TASKS), enabled=not args.no_progress, desc="model")
    bench = ModelBench(sizes, dtype, device, variants, progress, seed=args.seed,
                       compile_backend=args.compile_backend)
    meta = model_meta(args, argv, prog, bench, sizes, dtype, device)
    if args.out:
        bench.on_row = lambda rows: write_model_json(args.out, rows, meta, complete=False)
    try:
        rows = bench.run()
    except KeyboardInterrupt:
        kept = f"; the rows timed so far are in {args.out}" if args.out else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    print(format_table(rows, meta))
    failed = [r for r in rows if r.failed]
    if args.out:
        try:
            write_model_json(args.out, rows, meta)
            print(f"wrote {args.out}")
        except OSError as err:
            print(f"{prog}: error: could not write {args.out}: {err}", file=sys.stderr)
            return 1
    if failed:
        print(f"FAILED: {len(failed)} rows ({', '.join(sorted({r.variant for r in failed}))})")
        return 1
    print("OK: every row that ran passed its checks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
