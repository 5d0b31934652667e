"""``neuralink.Llama``: a drop-in ``llama_cpp.Llama`` whose FFNs run in neuralink's engine where memory is short."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from neuralink import _engine
from neuralink.errors import (
    EngineIOError,
    EngineNumericError,
    MemoryBudgetError,
    ModelFileError,
    OptionError,
    UnsupportedModelError,
)
from neuralink.formats.constants import LAZY_FFN_WEIGHTS_KEY
from neuralink.formats.sidecar import Sidecar
from neuralink.runtime.device_probe import read_cost_options
from neuralink.runtime.draft import (
    BoundedDraft,
    GatedDraft,
    PromptLookupDrafts,
    eval_with_sampled_rows,
    prompt_lookup_rows,
    verification_rows,
)
from neuralink.runtime.ffn_report import FfnReporting
from neuralink.runtime.hook import FfnHookApi, detach_before_free, ffn_hook_api
from neuralink.runtime.llama_ffn import FFN_CHOICES, FfnChoice, engine_options_given
from neuralink.runtime.llama_memory import MemoryPlanning
from neuralink.runtime.llama_params import outputs_per_micro_batch, without_weight_repacking
from neuralink.runtime.output_screen import check_output_screen_choice, confirm_output_screen, start_output_screen
from neuralink.runtime.memory_budget import (
    MemoryPlan,
    anonymous_resident_bytes,
    automatic_budget,
    bound_lookup_pages,
    capture_llama_log,
    check_memory_plan,
    llama_fits_whole,
    lock_every_token_weights,
    memory_budget_bytes,
    refuse_before_load,
    release_free_heap,
    resident_bytes,
    resolved_cache_policy,
    tight_cgroup_limit,
    warn_if_near_cgroup_limit,
)
from neuralink.runtime.sampler_release import SamplerRelease
from neuralink.runtime.sidecar_lookup import default_predictor, find_sidecar, named_sidecar

logger = logging.getLogger(__name__)

# n_batch under an explicit memory budget unless given (see the memory_budget argument)
BUDGET_N_BATCH = _engine.BUDGET_N_BATCH

_NOT_OFFERED = (
    "llama.cpp did not offer its FFN to the hook (a form neuralink does not serve: "
    "fused gate/up, per-tensor scales, clamped SwiGLU, a LoRA adapter on the FFN, or no build_ffn call)"
)


class Llama(FfnChoice, PromptLookupDrafts, FfnReporting, MemoryPlanning, SamplerRelease, llama_cpp.Llama):
    """``llama_cpp.Llama`` with every layer's dense FFN computed by neuralink's C++ engine (``ffn``).

    Takes the same arguments as ``llama_cpp.Llama``, plus the ones below. One default differs: ``n_threads``
    is one per physical core the process may use (its affinity and CPU quota), where llama-cpp-python takes
    half of the CPUs, which leaves cores idle on machines without SMT.

    sidecar:
        the bundle store of a model converted by ``neuralink convert``. By
        default the sidecar named in a converted model's metadata is used when
        it sits beside the model; ``False`` forces the dense engine (all FFN
        weights read into RAM once).
    predictor:
        how the active neurons are found with a sidecar: ``"gate"`` (gated
        FFNs: exact gate from resident gate rows, the sidecar's threshold),
        ``"lowrank"`` (the sidecar's low-rank predictor, any FFN: reads the
        predicted neurons' bundles), ``"dense"`` (every neuron: the
        reference), ``"oracle"`` (the true active set from resident weights,
        for measurement). Default: ``"gate"`` where it applies, else
        ``"lowrank"`` when the sidecar has one, else ``"dense"``.
    cache_policy, cache_bytes:
        the DRAM cache of neuron bundles (``auto``, ``none``, ``lru``, ``s3fifo``, ``linking``, ``pinned``,
        ``stream``) and its size. ``auto`` (the default): the whole store when the cache holds it; else ``stream``
        when collapsed reads would cover the layers anyway and the budget leaves room for its two buffers: no
        cache, every layer's records read whole into two buffers, ahead of the layer (Qwen2.5-Coder-1.5B under
        800 MB: 1.63 against 1.27 tok/s, the first token in 6.4 instead of 9.2 s); else ``pinned``, the most
        frequently needed records kept for good (they lie in stretches the reads then skip: on
        Qwen2.5-Coder-1.5B under a 1 GB cap 391 instead of 494 MiB read per token, SmolLM2 under 220 MB 15
        instead of 30). Without cache_bytes and memory_budget, the cache gets what the process may use, less
        everything else the memory plan counts (``memory_plan``): the tighter of its cgroup's memory limit
        (less 5 %, at least 24 MiB) and the system's available memory (less 10 %, at least 256 MiB); with free
        memory the whole store ends up cached.
    queue_depth:
        reads in flight at once (per compute thread with io_uring).
    io_backend:
        ``"auto"`` (io_uring where the kernel allows it, else a pool of pread threads), ``"uring"`` or ``"pread"``.
    collapse_gap:
        merge two runs of neurons into one read when the bytes between them are at most this many (default: from
        the device's cached profile, see ``neuralink device-profile``, else a phone-flash cost model).
    adaptive_collapse:
        fit the collapse gap to the reads' timing while running (docs/engine.md); off by default.
    memory_budget:
        the whole process's memory ("150MB", "1.5GiB" or bytes): with a sidecar, everything resident is
        accounted (see neuralink.runtime.memory_budget) and the bundle cache gets the rest; a budget below the
        minimum is refused with the minimum named. Overrides cache_bytes. Under a budget n_batch defaults to 64
        (not with embedding=True, whose text must fit one batch) instead of llama-cpp-python's 512, whose
        micro-batches need ~65 MiB more on Qwen2.5-Coder-1.5B, memory the cache would get. Without one, in a
        cgroup whose limit cannot hold the whole store, the process runs as under a budget of the limit less
        5 % (at least 24 MiB: page cache the cgroup charges), refused below the minimum as one is.
    direct_io:
        read weights and bundles with O_DIRECT, around the page cache (falls
        back to buffered reads where the filesystem refuses).
    thresholds, candidate_thresholds, predictor_thresholds:
        per-layer activity thresholds (and the contribution criterion's
        candidate thresholds, the low-rank predictor's thresholds) replacing
        the sidecar's, to run at another density without converting again;
        see ``neuralink.evaluate.density_sweep``. ``engine.set_thresholds``
        changes them on a loaded model.
    repack_weights:
        let llama.cpp copy the non-FFN weights it has faster kernels for (Q4_0, Q4_K, IQ4_NL) into repacked
        rows at load: anonymous memory beside the mapped file's pages, 80 MiB on Qwen2.5-Coder-1.5B. Default:
        off under a budget (explicit, or a tight cgroup limit), where memory is what is short, on otherwise.
    down_rows:
        when the cache holds the whole store, the down projection of the layers where the engine's cost model
        says it costs less by the converted GGUF's own ``ffn_down`` rows than by the sidecar's down columns
        (q4_K rows, ``neuralink convert --down-type q4_K``; docs/engine.md) is computed by the rows. Default
        on. ``"trial"``: where the room holds every layer's rows beside the store, rows and columns are timed
        on the first decoded tokens and the faster is kept; they are two encodings of the weights, so the
        greedy text then depends on the timing. False: the columns.
    preload:
        when the cache holds the whole store (``engine.cache_holds_store``),
        read it at load in long sequential reads, every record checked,
        instead of neuron by neuron during the first tokens. Default on.
    lock_weights:
        lock (mlock) the pages of the weights llama.cpp reads every token (attention, norms, output matrix) in
        its mapping of the model, so that a cgroup at its limit does not evict them only to fault them back in
        the next token. Default: on under a budget (whose plan counts them resident) when the weights are not
        repacked, and with llama-cpp-python's ``use_mlock=True`` (the default of its server),
        which is taken to mean this: passed to llama.cpp it would lock the whole mapping, the FFN weights the
        engine reads itself included. A lock the system refuses (``ulimit -l``) is logged and the model runs
        unlocked.

    ffn:
        who computes the FFNs: ``"engine"``, ``"llama"`` (llama.cpp itself, from the mapped weights, as
        ``llama_cpp.Llama`` on the same file: nothing of the sidecar is read) or ``"auto"`` (the default):
        llama.cpp for a converted model when stock llama.cpp running it whole fits what the process may use
        (``memory_budget.llama_fits_whole``: the memory there is, as above) and none of the engine's own arguments
        (sidecar=False, predictor, cache_policy, cache_bytes, queue_depth, io_backend, collapse_gap,
        adaptive_collapse, memory_budget, direct_io, the thresholds, down_rows, preload, lock_weights,
        prompt_lookup above 0, output_screen=True) is given; else the engine. Why: ``neuralink.runtime.llama_ffn``.
    prompt_lookup:
        decode with prompt lookup drafts of this many tokens (the continuation of the most recent earlier
        occurrence of the last tokens), each verified in one batch, whose records are read once for all its
        tokens. Default (None): 4 where every token reads the layers' records whole (cache policy ``stream``),
        while they give tokens faster than single decodes, both timed as it runs (tried once waiting for reads
        takes 35 % of a token: ``stall_share``); 0: none. Greedy text can differ where two tokens nearly tie
        (a batch sums in another order than one token, in stock llama.cpp too).
        llama-cpp-python's ``draft_model=`` replaces it, verified with the rows it samples (engine.md, "Drafts").
    output_screen:
        under a budget (``"auto"``, the default) a q3_K copy of an untied output matrix ranks the vocabulary, and the
        rows within 10 nats of its maximum are multiplied exactly, as llama.cpp does (Qwen2.5-Coder-1.5B: 101 MiB
        resident instead of 182.6); greedy decoding takes llama.cpp's token, unlikely tokens keep the copy's logits
        (engine.md, "The output screen"). True: always (refused where the model cannot have it); False: never.

    The default predictor is the one the conversion validated (its quality
    search measured perplexity on held-out calibration text within the
    budget, at the densities the sidecar records); a sidecar without a
    validated setting runs ``"dense"``, every neuron, and says so in the log.

    With the engine, the model is loaded with its FFN weights mapped lazily (never
    prefetched, repacked or read by llama.cpp), the engine attached to the context
    for its whole life and detached on ``close()``.

    Raises HookUnavailableError when llama-cpp-python is not the patched
    build, ModelFileError for unreadable or mismatched files and
    UnsupportedModelError for architectures or FFN forms the engine cannot
    serve. A failed read raises EngineIOError from the call that needed it;
    the context is left as it was before that call.
    """

    def __init__(
        self,
        model_path: str,
        *args: Any,
        sidecar: str | os.PathLike[str] | bool | None = None,
        predictor: str | None = None,
        cache_policy: str = "auto",
        cache_bytes: int = 0,
        queue_depth: int = _engine.DEFAULT_QUEUE_DEPTH,
        io_backend: str = "auto",
        collapse_gap: int | None = None,
        adaptive_collapse: bool = False,
        memory_budget: str | int | float | None = None,
        direct_io: bool = True,
        thresholds: Sequence[float] | None = None,
        predictor_thresholds: Sequence[float] | None = None,
        candidate_thresholds: Sequence[float] | None = None,
        repack_weights: bool | None = None,
        down_rows: bool | str = True,
        preload: bool = True,
        lock_weights: bool | None = None,
        prompt_lookup: int | None = None,
        ffn: str = "auto",
        output_screen: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        self._hook_api: FfnHookApi | None = None
        self._ffn_by_llama = False  # llama.cpp computes the FFNs: no engine (ffn=)
        self._closed = False
        self._draft_gate = _engine.DraftGate()  # single decodes timed by eval, verifications by GatedDraft
        self._engine: _engine.Engine | None = None
        self.memory_plan: MemoryPlan | None = None
        # llama_cpp.Llama.__del__ closes this stack even when __init__ failed early
        self._stack = contextlib.ExitStack()
        self._vocab_only = bool(kwargs.get("vocab_only"))
        if self._vocab_only:
            # the tokenizer only, as llama_cpp.Llama loads it: no FFN runs, so no engine (a hook attached to a
            # context without compute backends aborted the process in llama.cpp)
            self._start_reporting()
            self._neuralink_args = {}
            super().__init__(model_path, *args, **kwargs)
            return
        if not kwargs.get("n_threads"):  # None or 0: llama-cpp-python takes half of the CPUs, idle cores without SMT
            kwargs["n_threads"] = _engine.default_thread_count()
        budget = memory_budget_bytes(memory_budget) if memory_budget is not None else None
        if budget is not None:
            _engine.fix_malloc_thresholds()  # what is freed leaves the process, as the plan counts it
        baseline, anon_before = resident_bytes(), anonymous_resident_bytes()
        api = ffn_hook_api(_engine.FFN_HOOK_API_VERSION)
        if not os.path.exists(model_path):
            raise ModelFileError(f"{model_path}: no such model file")
        if down_rows not in (True, False, "trial"):
            raise OptionError(f"down_rows={down_rows!r}: expected True, False or 'trial'")
        if ffn not in FFN_CHOICES:
            raise OptionError(f"ffn={ffn!r}: expected one of {', '.join(map(repr, FFN_CHOICES))}")
        check_output_screen_choice(output_screen)
        engine_options = engine_options_given(
            sidecar=sidecar, predictor=predictor, cache_policy=cache_policy, cache_bytes=cache_bytes,
            queue_depth=queue_depth, io_backend=io_backend, collapse_gap=collapse_gap,
            adaptive_collapse=adaptive_collapse, memory_budget=memory_budget, direct_io=direct_io,
            thresholds=thresholds, predictor_thresholds=predictor_thresholds,
            candidate_thresholds=candidate_thresholds, down_rows=down_rows, preload=preload, lock_weights=lock_weights,
            prompt_lookup=prompt_lookup, output_screen=output_screen)
        if ffn == "llama" and engine_options:
            raise OptionError(f"{', '.join(engine_options)}: the engine's, but ffn='llama' has llama.cpp compute "
                              "the FFNs")
        sidecar_path = find_sidecar(model_path) if sidecar is None or sidecar is True else sidecar or None
        if sidecar_path is None and sidecar is not False and ffn != "llama" and named_sidecar(model_path):
            raise ModelFileError(
                f"{model_path}: converted by neuralink, but its sidecar {named_sidecar(model_path)} is not beside it; "
                "put it back, pass sidecar=<path>, or pass sidecar=False to run the dense engine (all FFN weights in RAM)"
            )
        engine_args: dict[str, Any] = dict(direct_io=direct_io)
        if sidecar_path is not None:
            # checksums, ranges and the recomputed model id, before the engine reads a byte of the records
            with Sidecar.open(sidecar_path, model_path) as opened:
                validated = opened.header.default_predictor
            # then the bytes llama.cpp will read from the converted GGUF, against what the conversion recorded
            _engine.verify_model_file(os.fspath(model_path), os.fspath(sidecar_path))
        if ffn == "llama" or ffn == "auto" and sidecar_path is not None and not engine_options:
            fits, figures = llama_fits_whole(model_path, kwargs, baseline)
            if ffn == "llama" or fits:
                self._load_for_llama_ffn(model_path, args, kwargs, ffn, sidecar, repack_weights,
                                         f"asked for (ffn='llama'; {figures})" if ffn == "llama" else
                                         f"the whole model fits what the process may use: {figures}")
                return
            logger.info("%s: neuralink's engine computes the FFNs: stock llama.cpp running the whole model would "
                        "need more than the process may use (%s)", model_path, figures)
        if sidecar_path is not None:
            engine_args.update(
                sidecar=os.fspath(sidecar_path), predictor=predictor or default_predictor(sidecar_path, validated),
                # auto: sized once the store's bytes are known (below); until then a cache whose hits need no
                # copies, as both policies auto stands for (the memory plan counts copies for the others)
                cache_policy="pinned" if cache_policy == "auto" else cache_policy,
                cache_bytes=0 if cache_policy == "auto" else cache_bytes, queue_depth=queue_depth,
                io_backend=io_backend,
            )
            engine_args.update(read_cost_options(sidecar_path, queue_depth))
            if collapse_gap is not None:
                engine_args["collapse_gap_bytes"] = collapse_gap
            engine_args["adaptive_collapse"] = adaptive_collapse
            if thresholds is not None:
                engine_args["thresholds"] = [float(t) for t in thresholds]
            if predictor_thresholds is not None:
                engine_args["predictor_thresholds"] = [float(t) for t in predictor_thresholds]
            if candidate_thresholds is not None:
                engine_args["candidate_thresholds"] = [float(t) for t in candidate_thresholds]
        elif thresholds is not None or predictor_thresholds is not None or candidate_thresholds is not None:
            raise OptionError(f"thresholds apply to a sidecar's sparse engine; {model_path} is used without one")
        elif predictor not in (None, "dense"):
            raise OptionError(f"predictor {predictor!r} needs a sidecar; {model_path} is used without one")
        if budget is not None and sidecar_path is None:
            raise MemoryBudgetError(
                f"{model_path}: a memory budget needs a model converted by neuralink and its sidecar "
                "(without one, the engine keeps every FFN weight in RAM)"
            )
        automatic = None  # (budget, its source, from a cgroup limit) when the cache is sized from the memory there is
        if budget is None and sidecar_path is not None and cache_bytes == 0 and cache_policy != "none":
            automatic = automatic_budget()
            if automatic is not None:
                budget = automatic[0]
                if automatic[2]:  # a cgroup's limit: what is freed leaves the process, as the plan counts it
                    _engine.fix_malloc_thresholds()
        # the engine reads what it keeps of the FFN weights itself, before llama.cpp maps the rest
        engine = _engine.Engine(os.fspath(model_path), **engine_args)
        if cache_policy == "auto" and cache_bytes and budget is None and sidecar_path is not None:
            engine.configure_cache(resolved_cache_policy(cache_policy, engine, cache_bytes), cache_bytes)
        if not engine.direct_io and direct_io:
            logger.warning("%s: %s", model_path, engine.io_note)
        if engine.io_backend_note:
            logger.info("%s: %s", model_path, engine.io_backend_note)

        if memory_budget is not None and budget is not None:
            warn_if_near_cgroup_limit(model_path, budget)
        # an explicit budget, or a cgroup's limit too tight for the whole store: memory is what is short
        bounded = memory_budget is not None or tight_cgroup_limit(engine, automatic, kwargs, baseline)
        if bounded and "n_batch" not in kwargs and not kwargs.get("embedding"):
            kwargs["n_batch"] = BUDGET_N_BATCH  # (an embedding's whole input must fit one batch: not then)
        kv_overrides = dict(kwargs.pop("kv_overrides", None) or {})
        kv_overrides[LAZY_FFN_WEIGHTS_KEY] = True
        # before the plans count it: a coarse copy of the output matrix in its place, the matrix mapped lazily
        start_output_screen(engine, output_screen, bounded, model_path, kwargs["n_threads"], kv_overrides)
        if budget is not None and (automatic is None or automatic[2]):
            # below the minimum before llama.cpp allocates its KV cache (n_ctx=0 under a cgroup's limit was killed)
            refuse_before_load(engine, budget, baseline, model_path, kwargs, automatic[1] if automatic else None)
        # llama.cpp's mlock would lock the whole mapping, the FFN tensors the engine reads itself included (1 GB on
        # Qwen2.5-Coder-1.5B; llama-cpp-python's server asks for it by default): the every-token weights instead
        use_mlock = bool(kwargs.pop("use_mlock", False))
        # llama.cpp reports its KV, output and compute buffers in its log; attaching re-reserves the latter
        repack = repack_weights if repack_weights is not None else not bounded
        # logits_all or embeddings need a whole micro-batch of output rows; else one (38 -> 4 MiB of compute buffer
        # on Qwen2.5-Coder), or a draft's verification rows (neuralink.runtime.draft)
        rows = 0 if kwargs.get("logits_all") or kwargs.get("embedding") else 1
        n_batch = kwargs.get("n_batch", 512)  # llama_cpp.Llama's default
        lookup = 0  # prompt lookup's proposals, if the cache leaves the records to be read every token
        if rows and kwargs.get("draft_model") is not None:
            rows = verification_rows(kwargs["draft_model"], n_batch)
            kwargs["draft_model"] = BoundedDraft(kwargs["draft_model"], rows - 1)
        elif rows and sidecar_path is not None and prompt_lookup != 0:
            lookup = (rows := prompt_lookup_rows(prompt_lookup, n_batch)) - 1
        with capture_llama_log() if budget is not None else contextlib.nullcontext([]) as log, \
                contextlib.nullcontext() if repack else without_weight_repacking(), \
                outputs_per_micro_batch(rows) if rows else contextlib.nullcontext():
            super().__init__(model_path, *args, kv_overrides=kv_overrides, **kwargs)
            api.attach(self._ctx.ctx, engine.hook_address)
            confirm_output_screen(engine, model_path)
            # what the load parsed and freed (llama.cpp's vocabulary maps, the GGUF's metadata) leaves the heap
            release_free_heap()
            load_anon_growth = max(0, anonymous_resident_bytes() - anon_before)
        self._verification_rows = rows if self.draft_model is not None or lookup else 0
        if self._verification_rows:
            # llama-cpp-python turned logits_all on for the draft and allocated an n_ctx x n_vocab copy of the
            # logits (untouched, so not yet resident): sampling reads the rows from the context instead
            self._logits_all = False
            self.scores = np.ndarray((self.n_batch, self._n_vocab), dtype=np.single)
        self._hook_api, self._engine = api, engine
        self._stack.callback(detach_before_free, api, self._ctx)
        if budget is not None:
            if self.verbose:
                print("".join(log), end="", file=sys.stderr)
            self.memory_plan = self._plan_memory(budget, baseline, log, load_anon_growth)
            self._stream_gate_rows_to_fit(budget, baseline, log, load_anon_growth, cache_policy)
            if automatic is None or automatic[2]:
                # asked for, or a cgroup's limit, above which the kernel kills: refused below the minimum
                try:
                    check_memory_plan(self.memory_plan, model_path, engine,
                                      self.scores.nbytes if self._logits_all else 0,
                                      limit=automatic[1] if automatic else None,
                                      unmapped=not self._weights_mapped)
                except MemoryBudgetError:
                    self.close()
                    raise
            if automatic is not None:  # nobody asked for a budget: the cache sized from what is there
                plan = self.memory_plan
                logger.info("%s: bundle cache %.0f MiB of a %.0f MiB store, sized from %s (memory_budget= or "
                            "cache_bytes= choose it)", model_path, plan.cache / 2**20, plan.store_bytes / 2**20,
                            automatic[1])
            cache = self.memory_plan.cache
            engine.configure_cache(resolved_cache_policy(cache_policy, engine, cache), cache)
            if engine.streams_regions:
                # its two buffers replace the read buffers the plan counted: the plan as it now stands
                self.memory_plan = self._plan_memory(budget, baseline, log, load_anon_growth)
                logger.info("%s: every layer's records read whole, ahead of the layer, into two buffers of "
                            "%.1f MiB, less the head of each region kept in RAM (%.0f of %.0f MiB; cache_policy "
                            "'stream')", model_path, engine.stream_buffer_bytes / 2 / 2**20,
                            engine.stream_head_bytes / 2**20, self.memory_plan.store_bytes / 2**20)
        if lookup:
            self._use_prompt_lookup(lookup, automatic=prompt_lookup is None)
        # use_mmap=False: llama.cpp reads the weights it uses into its heap, where nothing can evict them; its
        # mapping then holds the FFN tensors only for the hook, and locking or bounding pages there would fault in
        # copies nobody reads (268 MiB on Qwen2.5-Coder-1.5B)
        mapped = self._weights_mapped
        if budget is not None and sidecar_path is not None and mapped:
            # the plan counts one micro-batch's token embedding lookups mapped, not the table
            _, why = bound_lookup_pages(engine)
            if why:
                logger.warning("%s: %s; the token embedding's lookups stay mapped", model_path, why)
        # (repacked weights are read from their anonymous copies, not from the mapping)
        lock = lock_weights if lock_weights is not None else \
            (use_mlock or bounded and sidecar_path is not None) and not repack
        if lock and not mapped:
            logger.info("%s: use_mmap=False: the weights llama.cpp reads every token are in its heap, not locked",
                        model_path)
        elif lock:
            locked, why = lock_every_token_weights(engine)
            if why:
                logger.warning("%s: %s; %.0f MiB locked, the rest may be evicted and read again", model_path, why,
                               locked / 2**20)
            else:
                logger.info("%s: %.0f MiB of weights read every token locked in RAM", model_path, locked / 2**20)
        if engine.cache_holds_store:  # from a budget, the memory there is, or cache_bytes
            self._hold_store(down_rows, preload, cache_bytes)
        self._neuralink_args = dict(sidecar=sidecar, predictor=predictor, cache_policy=cache_policy,
                                    cache_bytes=cache_bytes, queue_depth=queue_depth, io_backend=io_backend,
                                    collapse_gap=collapse_gap, adaptive_collapse=adaptive_collapse,
                                    memory_budget=memory_budget, direct_io=direct_io, down_rows=down_rows,
                                    thresholds=thresholds, predictor_thresholds=predictor_thresholds,
                                    repack_weights=repack_weights, preload=preload,
                                    candidate_thresholds=candidate_thresholds, lock_weights=lock_weights,
                                    prompt_lookup=prompt_lookup, use_mlock=use_mlock, ffn=ffn,
                                    output_screen=output_screen)
        self._start_reporting()

        refused = [s for s in engine.layer_status() if not s.taken]
        if refused:
            details = "; ".join(f"layer {s.il}: {s.reason or _NOT_OFFERED}" for s in refused[:3])
            more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
            self.close()
            raise UnsupportedModelError(
                f"{model_path}: architecture '{engine.architecture}': {len(refused)} of "
                f"{engine.n_layer} layers cannot be served by neuralink: {details}{more}"
            )

    def eval(self, tokens: Sequence[int]) -> None:
        if self._ffn_by_llama:
            self._check_open()
            return super().eval(tokens)
        engine = self.engine  # (closed: a clear error, where llama.cpp would be handed a freed context)
        n_before, start = self.n_tokens, time.perf_counter()
        if self._verification_rows:
            eval_with_sampled_rows(self, tokens, self._verification_rows)
        else:
            super().eval(tokens)
        rows = self._record_stats(engine.take_stats())
        seconds = time.perf_counter() - start
        error = engine.error()
        if error:
            # the failed call's KV entries are dropped by the next eval, which starts at n_tokens; the context's
            # logits are the failed decode's, so the next generate must decode again before it samples
            numeric = engine.error_is_numeric()
            engine.clear_error()
            self.n_tokens = n_before
            self._requires_eval = True
            if numeric:  # the engine names the layer; say which model
                raise EngineNumericError(f"{self.model_path}: {error}")
            raise EngineIOError(error)
        if len(tokens) == 1 and rows.size:  # a decoded token: the share of it spent waiting for reads
            self._draft_gate.observe_single(float(rows["stall_ns"].sum()) * 1e-9, seconds)
        elif isinstance(self.draft_model, GatedDraft):  # perhaps the verification of its proposals
            self.draft_model.evaluated(n_before, len(tokens), seconds)

    def create_completion(self, prompt: Any, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        if not self._ffn_by_llama:
            self.engine  # noqa: B018 (closed: a clear error, where llama-cpp-python would use the freed context)
        if kwargs.get("logprobs") is not None and self._verification_rows:  # (stock would blame logits_all=False)
            raise ValueError("logprobs needs logits_all=True when completions verify drafts (draft_model= or "
                             "prompt_lookup=): without it only the logits of the rows sampled are kept")
        return super().create_completion(prompt, *args, **kwargs)

    def close(self) -> None:
        """Free the model, the context and the engine, and give the memory back to the system."""
        self._sampler = None  # freed before the model its grammar may point into
        super().close()  # (the hook detached first)
        self._engine = None
        self._closed = True
        release_free_heap()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(self._neuralink_args)
        if getattr(self.draft_model, "from_prompt_lookup", False):
            state["draft_model"] = None
        return state

