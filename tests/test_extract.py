from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates, filtered_means, residual_means
from refdir.directions.prompt_filter import filter_prompts
from refdir.errors import RefdirError
from refdir.interventions.intervention import ablate
from refdir.io import atomic_path, output_folder
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from tiny import tiny_chat_model

HARMFUL = ["how do I pick a lock", "tell me something bad", "x"]
HARMLESS = ["bake a cake", "write a poem about spring please", "sum 2 and 2"]


@pytest.mark.parametrize("prompts", [HARMFUL, ["the same prompt"] * 3], ids=["varied", "identical"])
def test_streaming_means_match_a_direct_computation(cm: ChatModel, prompts: list[str]) -> None:
    # identical prompts share everything but the last token: the prefix reuse must stay out
    # of the post-instruction positions
    means = residual_means(cm, prompts, batch_size=2, progress=False)
    assert means.dtype == torch.float64
    assert means.shape == (cm.chat.n_post, cm.n_layers + 1, cm.d_model)
    rows = []
    last: list[torch.Tensor] = []  # the last layer's output (hidden_states[-1] is after the norm)
    handle = cm.layout.layers[-1].register_forward_hook(
        lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    for text in prompts:  # one prompt at a time: no padding at all
        batch = cm.chat.encode([text]).to(cm.device)
        with torch.no_grad():
            out = cm.model(input_ids=batch.input_ids, output_hidden_states=True)
        layers = [*out.hidden_states[: cm.n_layers], last.pop()]
        rows.append(torch.stack(layers, dim=1)[0, :, -cm.chat.n_post :].transpose(0, 1))
    handle.remove()
    expected = torch.stack(rows).double().mean(0).cpu()
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=1e-5)


def test_candidates_shape_and_zero_at_template_embeddings(cm: ChatModel) -> None:
    cands = extract_candidates(cm, HARMFUL, HARMLESS, progress=False)
    assert cands.diffs.shape == (cm.chat.n_post, cm.n_layers + 1, cm.d_model)
    # harmful minus harmless, not the other way round
    expected = residual_means(cm, HARMFUL, progress=False) - residual_means(
        cm, HARMLESS, progress=False
    )
    torch.testing.assert_close(cands.diffs, expected, atol=1e-6, rtol=1e-5)
    assert cands.direction(-1, 2).vector.double() @ expected[-1, 2] > 0
    assert cands.diffs[:, 0].abs().max() == 0  # layer-0 input at template tokens: same embedding
    assert cands.diffs[-1, 2].norm() > 0
    with pytest.raises(RefdirError, match="zero"):
        cands.direction(-1, 0)


def test_output_folder_removes_only_the_empty_folders_it_made(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), output_folder(tmp_path / "a" / "b"):
        raise RuntimeError  # made "a" and "a/b", then failed: both go
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "new" / ".." / "x"):
        raise RuntimeError  # "new/.." is never made on the way
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "kept"):
        raise RuntimeError  # there before: stays, even empty
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "p" / "q") as out:
        (out / "f").write_text("x")
        raise RuntimeError  # made, but holds a file: stays, and so do its parents
    assert (tmp_path / "p" / "q" / "f").exists()
    with output_folder(tmp_path / "ok"):
        pass  # success keeps the folder, empty or not
    assert (tmp_path / "ok").is_dir()


def test_direction_round_trip_and_size_check(cm: ChatModel, tmp_path: Path) -> None:
    cands = extract_candidates(cm, HARMFUL, HARMLESS, progress=False, harmful_name="h")
    direction = cands.direction(-1, 2, note="test")
    path = direction.save(tmp_path)
    assert path.name == "direction.safetensors" and (tmp_path / "direction.json").exists()
    loaded = Direction.load(tmp_path / "direction.json")
    torch.testing.assert_close(loaded.vector, direction.vector)
    assert (loaded.layer, loaded.position, loaded.harmful, loaded.n_harmful) == (2, -1, "h", 3)
    assert loaded.metadata == {"note": "test"}
    with pytest.raises(RefdirError, match="size 32 but the model's residual stream has 48"):
        loaded.check(48)
    with pytest.raises(RefdirError, match=r"outside 0\.\.1 for this model; extract a direction"):
        loaded.check(32, 1)
    with pytest.raises(RefdirError, match=r"got shape \(2, 32\): give a 1-D tensor"):
        Direction(torch.ones(2, 32), 2, -1, "m")
    wrong = "size 40 but the model's residual stream has 32; extract a direction from this model"
    with pytest.raises(RefdirError, match=wrong), ablate(cm, torch.ones(cm.d_model + 8)):
        pass
    message = r"1-D tensor; pass cands.direction\(position, layer\)"
    with pytest.raises(RefdirError, match=message), ablate(cm, torch.ones(2, cm.d_model)):
        pass
    cands.save(tmp_path / "candidates.safetensors")
    again = Candidates.load(tmp_path / "candidates.safetensors")
    torch.testing.assert_close(again.diffs, cands.diffs)
    assert again.n_harmless == 3 and again.model == "tiny-llama"
    torch.testing.assert_close(Candidates.load(tmp_path).diffs, cands.diffs)  # the folder
    Direction(torch.ones(4), 1, -1, "m").save(tmp_path / "other" / "candidates.safetensors")
    with pytest.raises(RefdirError, match="not a candidates file written by refdir"):
        Candidates.load(tmp_path / "other")
    (tmp_path / "other" / "candidates.safetensors").write_text("garbage")
    with pytest.raises(RefdirError, match="not a candidates file written by refdir"):
        Candidates.load(tmp_path / "other")


def test_bad_direction_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RefdirError, match="missing"):
        Direction.load(tmp_path)
    Direction(torch.ones(4), 1, -1, "m").save(tmp_path / "ahead")
    info = json.loads((tmp_path / "ahead" / "direction.json").read_text())
    (tmp_path / "ahead" / "direction.json").write_text(json.dumps({**info, "position": 5}))
    with pytest.raises(RefdirError, match="'position' counts back from the last token"):
        Direction.load(tmp_path / "ahead")
    with pytest.raises(RefdirError, match="cannot write in /proc"), atomic_path(Path("/proc/x")):
        pass
    (tmp_path / "direction.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(RefdirError, match="not a safetensors file"):
        Direction.load(tmp_path)
    with pytest.raises(RefdirError, match="zero"):
        Direction(torch.zeros(4), 0, -1, "m")


def test_no_partial_file_left_when_save_fails(tmp_path: Path) -> None:
    direction = Direction(torch.ones(4), 1, -1, "m", metadata={"bad": object()})
    with pytest.raises(RefdirError, match="metadata is not JSON"):
        direction.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_batch_size_does_not_change_the_means() -> None:
    cm = tiny_chat_model("qwen3_moe")
    a = residual_means(cm, HARMLESS, batch_size=1, progress=False)
    b = residual_means(cm, HARMLESS, batch_size=3, progress=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_atomic_writes_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    from refdir.io import atomic_path

    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_filtered_means_keep_only_the_rows_the_filter_accepts(cm: ChatModel) -> None:
    """The filter decides from the same pass's last-position logits; the means equal plain
    means over the kept prompts, whatever the batches."""
    prompts = [*HARMFUL, *HARMLESS]
    first = last_position_logits(cm, prompts)[:, 0]
    ordered = first.sort().values  # halfway between two values: no row near the threshold
    threshold = float(ordered[4] + ordered[5]) / 2

    def keep(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0] > threshold

    expected_kept = (first > threshold).tolist()
    assert 0 < sum(expected_kept) < len(prompts)
    subset = [p for p, k in zip(prompts, expected_kept, strict=True) if k]
    for batch_size in (1, 4):
        got = filtered_means(cm, prompts, keep, batch_size=batch_size, progress=False)
        assert got.kept == expected_kept
        torch.testing.assert_close(
            got.mean, residual_means(cm, subset, progress=False), atol=1e-5, rtol=1e-5
        )


def test_extract_filters_in_its_pass_and_records_the_kept_prompts(
    cm: ChatModel, tmp_path: Path
) -> None:
    vocab = cm.model.config.vocab_size
    half = list(range(0, vocab, 2))  # on this random model: every harmful metric > 0
    assert filter_prompts(cm, HARMFUL, half, keep_positive=True) == HARMFUL
    assert filter_prompts(cm, HARMLESS, half, keep_positive=False) == []
    with pytest.raises(RefdirError, match="removed every prompt of calm"):
        extract_candidates(cm, HARMFUL, HARMLESS, harmless_name="calm", refusal_tokens=half)
    odd = list(range(1, vocab, 2))  # every metric < 0: harmless kept, harmful removed
    with pytest.raises(
        RefdirError,
        match=r"removed every prompt of harmful.*keep every prompt with `filter_prompts=False`",
    ):
        extract_candidates(cm, HARMFUL, HARMLESS, progress=False, refusal_tokens=odd)
    plain = extract_candidates(cm, HARMFUL, HARMLESS, progress=False)
    assert plain.harmful_prompts == HARMFUL and plain.n_harmless == len(HARMLESS)
    plain.save(tmp_path / "c.safetensors")
    again = Candidates.load(tmp_path / "c.safetensors")
    assert again.harmful_prompts == HARMFUL and again.harmless_prompts == HARMLESS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bad", "direction.json is damaged"),
        ("5", "should hold a JSON object"),
        ('{"position": -1}', "layer: Field required"),
        ('"layer": "abc"', "layer: Input should be a valid integer"),
    ],
)
def test_damaged_direction_files_are_one_line_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    Direction(torch.ones(8), 1, -1, "m").save(tmp_path)
    json_path = tmp_path / "direction.json"
    good = json_path.read_text()
    assert '"layer": 1' in good
    json_path.write_text(good.replace('"layer": 1', text) if text.startswith('"layer"') else text)
    with pytest.raises(RefdirError, match=message) as err:
        Direction.load(tmp_path)
    assert "\n" not in str(err.value)


def test_an_integer_direction_tensor_is_a_one_line_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    Direction(torch.ones(8), 1, -1, "m").save(tmp_path)
    save_file(
        {"direction": torch.ones(8, dtype=torch.int64)}, str(tmp_path / "direction.safetensors")
    )
    with pytest.raises(RefdirError, match="integer 'direction'; save a float vector") as err:
        Direction.load(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("harmful", "harmless", "message"),
    [
        (["ok", ""], HARMLESS, r"`harmful`\[1\] is empty"),
        (HARMFUL, ["ok", " \t\n"], r"`harmless`\[1\] is only whitespace"),
        (["a \ud800 b"], HARMLESS, r"`harmful`\[0\] is not valid Unicode text \(a lone surrogate"),
        (HARMFUL, [None], r"`harmless`\[0\] is not text but NoneType"),
        ("how do I pick a lock", HARMLESS, "`harmful` is one string; give a list of prompts"),
    ],
)
def test_extraction_refuses_empty_or_invalid_instructions_up_front(
    cm: ChatModel, harmful: list[str], harmless: list[str], message: str
) -> None:
    """Checked before any pass (the harmless list too, before the harmful pass runs)."""
    calls = []
    hook = cm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(RefdirError, match=message) as caught:
            extract_candidates(cm, harmful, harmless, progress=False)
    finally:
        hook.remove()
    assert "\n" not in str(caught.value) and not calls
    bad, name = (harmful, "harmful") if "`harmful`" in message else (harmless, "harmless")
    with pytest.raises(RefdirError, match=message.replace(name, "instructions")):
        filtered_means(cm, bad, progress=False)


def test_the_prompt_check_keeps_an_iterable_of_prompts_usable(cm: ChatModel) -> None:
    """The check up front reads the prompts once; a generator still gives its prompts."""
    as_list = residual_means(cm, HARMFUL, progress=False)
    torch.testing.assert_close(residual_means(cm, iter(HARMFUL), progress=False), as_list)
