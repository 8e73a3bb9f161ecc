"""Prompt tuning and LoRA on a tiny model built from a config: the loss falls, the adapter round-trips
through the store, rows with different soft prompts share a call and give what they give alone,
training resumes after SIGKILL, and bad input gets a clear error and changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import func, select

from models.adapters import find_adapter
from models.errors import AdapterError
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from models.tables import Adapter, Batch
from producer.client import Client
from tests.conftest import ROOT, settings_env, wait_for
from tests.worker.tiny_chat import build, corpus_pairs
from worker import tuning
from worker.backends.base import AdapterSpec, Row

pytestmark = pytest.mark.model
PLAN = PromptPlan(TEMPLATES["one-sentence"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-chat"))


def _settings(tmp_path: Path, tiny: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 't.db'}",
        model=str(tiny),
        adapter_dir=str(tmp_path / "adapters"),
        dtype="float32",
    )


def _examples(repeat: int = 2) -> list[tuning.Example]:
    return [tuning.Example(d, r) for d, r in corpus_pairs()] * repeat


@pytest.mark.parametrize("method, rate, falls_to", [("prompt-tuning", 0.3, 0.97), ("lora", 0.01, 0.8)])
def test_training_lowers_the_loss_and_the_adapter_round_trips(
    tmp_path: Path, tiny: Path, method: str, rate: float, falls_to: float
) -> None:
    settings = _settings(tmp_path, tiny)
    client = Client(settings)
    client.ensure_schema()
    config = tuning.TuneConfig(method=method, virtual_tokens=4, epochs=6, learning_rate=rate, batch_size=4)
    heldout = [tuning.Example(d, r) for d, r in corpus_pairs()[:2]]
    outcome = tuning.run(client.sessions, settings, "tiny", _examples(), heldout, config, None, 8)
    result = outcome.result
    # 4 soft tokens steer a random tiny model a little (~7% measured), a LoRA a lot (~40%)
    assert result.steps == 24 and result.last_loss < result.first_loss * falls_to, (result.first_loss, result.last_loss)
    with client.sessions() as session:
        stored = find_adapter(session, outcome.adapter)
    assert (stored.name, stored.version, stored.method, stored.base_model) == ("tiny", 1, method, str(tiny))
    assert stored.train_examples == 16 and len(stored.data_fingerprint) == 64
    assert stored.scores is not None and set(stored.scores) == {"n", "zero_shot", "adapter", "lead3"}
    files = tmp_path / "adapters" / stored.path
    weights = load_file(str(files / "adapter_model.safetensors"))
    if method == "prompt-tuning":
        assert weights["prompt_embeddings"].shape == (4, 32)
    else:
        assert any("lora_A" in name for name in weights)
    again = tuning.run(client.sessions, settings, "tiny", _examples(), [], config, None, 8)
    assert again.adapter == "tiny@2" and again.result.resumed_from == 0  # a new version, a fresh start


def test_rows_with_different_soft_prompts_share_a_call(tmp_path: Path, tiny: Path) -> None:
    settings = _settings(tmp_path, tiny)
    backend = tuning.load_base(str(tiny), settings)
    specs = []
    for name, seed in (("a", 1), ("b", 2)):
        config = tuning.TuneConfig(virtual_tokens=3, max_steps=6, learning_rate=0.3, seed=seed, batch_size=2)
        out = tmp_path / name
        pairs = _examples(1)[seed:] if seed == 1 else _examples(1)
        tuning.tune(backend, settings, pairs, PLAN, config, tmp_path / f"work-{name}", out)
        specs.append(AdapterSpec(f"{name}@1", "prompt-tuning", str(out), 3))
    rows = [
        Row(backend.tokenizer.encode("<|user|> the council met on tuesday <|assistant|>"), 8, adapter=specs[0]),
        Row(backend.tokenizer.encode("<|user|> a comet was seen <|assistant|>"), 8, adapter=specs[1]),
        Row(backend.tokenizer.encode("<|user|> the bakery closed <|assistant|>"), 8),
        Row(backend.tokenizer.encode("<|user|> the library opened late <|assistant|>"), 5, adapter=specs[0]),
    ]
    together = [g.tokens for g in backend.generate(rows)]
    alone = [backend.generate([row])[0].tokens for row in rows]
    assert together == alone
    # on a CPU, soft prompts are read with the prompts into the static cache in sub-batches of rows; they give
    # what generate() from the whole call's input embeddings gives
    assert backend.prefill_tokens and backend.static_cache
    assert [g.tokens for g in backend._generate_embedded(rows)] == together
    plain = [backend.generate([Row(row.ids, row.max_new_tokens)])[0].tokens for row in rows]
    assert together[0] != plain[0] or together[1] != plain[1]  # the soft prompts change what is generated
    assert len(together[3] or []) <= 5  # each row stops at its own limit
    # an adapter record whose length disagrees with its file is refused by name, not with a tensor shape error
    wrong = AdapterSpec("a@9", "prompt-tuning", specs[0].path, 5)
    with pytest.raises(ValueError, match=r"adapter a@9: its soft prompt is 3 x 32; this model takes 5 x 32"):
        backend.generate([Row(rows[0].ids, 4, adapter=wrong)])


def test_training_resumes_after_sigkill(tmp_path: Path, tiny: Path) -> None:
    settings = _settings(tmp_path, tiny)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": d, "summary": r}) + "\n" for d, r in corpus_pairs() * 8))
    command = [sys.executable, "-m", "producer.cli", "tune", str(train), "--name", "resumed", "--max-steps", "40"]
    command += ["--batch-size", "2", "--checkpoint-every", "5", "--virtual-tokens", "4", "--epochs", "2"]
    env = settings_env(settings)
    log = tmp_path / "first.log"
    with log.open("wb") as handle:
        first = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        checkpoints = tmp_path / "adapters" / ".training"
        wait_for(lambda: list(checkpoints.rglob("checkpoint.pt")), 120, "a checkpoint", poll=0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter resumed@1: 40 steps" in done.stdout and "resumed at step " in done.stdout, done.stdout
    client = Client(settings)
    with client.sessions() as session:  # one adapter: the killed run recorded none
        assert session.scalar(select(func.count()).select_from(Adapter)) == 1


def test_bad_input_gets_a_clear_error_and_changes_nothing(tmp_path: Path, tiny: Path) -> None:
    settings = _settings(tmp_path, tiny)
    env = settings_env(settings)

    def tune(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "producer.cli", "tune", *args, "--max-steps", "1"]
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)

    no_field = tmp_path / "no-field.jsonl"
    no_field.write_text('{"text": "A document. More."}\n{"text": "Another.", "summary": "  "}\n')
    done = tune(str(no_field), "--name", "x")
    assert done.returncode == 1 and "no-field.jsonl: 2 bad training row(s); nothing was tuned" in done.stderr
    assert f'{no_field}:1: has no reference field "summary"' in done.stderr
    assert f'{no_field}:2: has an empty or non-string reference field "summary"' in done.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "A document. More.", "summary": "A document."}) + "\n")
    lead = tune(str(good), "--name", "x", "--model", "lead")
    assert lead.returncode == 1 and "model 'lead' has no weights to tune" in lead.stderr
    bad_name = tune(str(good), "--name", "Not A Name")
    assert bad_name.returncode == 1 and "adapter name 'Not A Name': use 1-64 lowercase letters" in bad_name.stderr

    client = Client(settings)
    client.ensure_schema()
    config = tuning.TuneConfig(virtual_tokens=2, max_steps=1)
    made = tuning.run(client.sessions, settings, "made", _examples(1), [], config, None, 8)
    other = settings.model_copy(update={"model": "lead"})
    with pytest.raises(AdapterError, match=rf"adapter made@1 was tuned on model '{tiny}', not 'lead'"):
        Client(other).submit(["A document. More."], model="lead", adapter=made.adapter, publish=False)
    with pytest.raises(AdapterError, match=r"no adapter 'nope' \(adapters: made@1"):
        client.submit(["A document. More."], adapter="nope", publish=False)
    with client.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 0  # nothing was submitted


@pytest.mark.services
def test_a_worker_runs_a_batch_with_its_adapter(
    fleet_settings: Settings, tmp_path: Path, tiny: Path, start_worker
) -> None:
    settings = fleet_settings.model_copy(update={"model": str(tiny), "adapter_dir": str(tmp_path / "adapters")})
    client = Client(settings)
    client.ensure_schema()
    config = tuning.TuneConfig(virtual_tokens=3, max_steps=4, learning_rate=0.3, batch_size=2)
    made = tuning.run(
        client.sessions,
        settings.model_copy(update={"dtype": "float32"}),
        "fleet",
        _examples(1),
        [],
        config,
        None,
        8,
    )
    worker = start_worker(settings, str(tiny))
    worker.wait_ready(120)
    submission = client.submit([d for d, _ in corpus_pairs()], adapter="fleet", max_new_tokens=6)
    status = wait_for(lambda: (s := client.status(submission.batch_id)).done and s, 120, "the batch", poll=0.3)
    assert status.counts == {"succeeded": 8}, worker.text()[-3000:]
    assert status.adapter == made.adapter == "fleet@1"
    assert {row["adapter"] for row in client.results(submission.batch_id)} == {"fleet@1"}


def test_epochs_are_batched_whole_even_when_the_batch_size_does_not_divide_them() -> None:
    batches = tuning._batches(5, tuning.TuneConfig(batch_size=2, seed=3), epochs=2)
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]
    assert sorted(i for b in batches[:3] for i in b) == sorted(i for b in batches[3:] for i in b) == [0, 1, 2, 3, 4]


def _submit_tuning(settings: Settings, train: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "producer.cli", "tune", str(train), "--name", "fleet-tuned", "--submit"]
    done = subprocess.run([*command, *extra], env=settings_env(settings), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.services
def test_a_tuning_run_given_to_the_fleet_resumes_after_its_worker_died(
    fleet_settings: Settings, tmp_path: Path, tiny: Path, start_worker
) -> None:
    settings = fleet_settings.model_copy(
        update={"model": str(tiny), "adapter_dir": str(tmp_path / "adapters"), "tune_lease": 2, "sweep_interval": 0.5}
    )
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": d, "summary": r}) + "\n" for d, r in corpus_pairs() * 8))
    run_id = _submit_tuning(settings, train, "--max-steps", "200", "--epochs", "20", "--checkpoint-every", "5")
    assert run_id.startswith("tune_")
    client = Client(settings)
    assert client.tuning_status(run_id)["state"] == "queued"
    first = start_worker(settings, str(tiny), "--tune")
    checkpoints = tmp_path / "adapters" / ".training"
    wait_for(lambda: list(checkpoints.rglob("checkpoint.pt")), 120, "a checkpoint", poll=0.05)
    os.killpg(first.process.pid, signal.SIGKILL)  # mid-training: the run keeps its lease until it runs out
    first.process.wait(10)
    assert client.tuning_status(run_id)["state"] == "running"
    second = start_worker(settings, str(tiny), "--tune")
    run = wait_for(
        lambda: (r := client.tuning_status(run_id))["state"] in ("completed", "failed") and r, 300, "the run", poll=0.5
    )
    assert run["state"] == "completed", second.text()[-3000:]
    assert run["adapter"] == "fleet-tuned@1" and run["step"] == run["total_steps"] == 200
    assert "resuming training at step" in second.text() and "lost its worker; published again" in second.text()
    status = subprocess.run(
        [sys.executable, "-m", "producer.cli", "status", run_id],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "completed" in status.stdout and "adapter fleet-tuned@1" in status.stdout
