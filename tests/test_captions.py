"""Image captioning (issue 25): one image path (a CNN stem and encoder blocks read by cross-attention) for every
encoder-decoder family; the image's encoding is fixed through every sampler; classifier-free guidance with w = −1 is
the model without the image; captions are batch invariant; a tiny captioner learns single-item class captions; bad
images are one-line errors."""

import numpy as np
import pytest
import torch
from conftest import one_line_error

from difflm import registry
from difflm.config import RunConfig
from difflm.data.corpora import load_lines
from difflm.data.datasets import build_dataset, image_tensor
from difflm.data.images import write_png
from difflm.data.scenes import caption_metrics, load_fashion_mnist, scenes_for
from difflm.data.tokenizers import build_tokenizer
from difflm.errors import DiffLMError
from difflm.pipeline import DiffusionLM
from difflm.training.trainer import Trainer

FAMILIES = ("masked", "autoregressive", "gaussian", "uniform", "sedd", "d3pm", "block", "edit")


def scenes_run(family: str, steps: int, items="1", classes=("trouser", "bag"), absolute=True, model=None,
               **train) -> RunConfig:
    process = {"type": family} | ({"embed_dim": 16} if family == "gaussian" else {})
    return RunConfig.from_dict({
        "name": f"captions-{family}",
        "data": {"corpus": "scenes", "scenes": 2000, "eval_scenes": 100, "scene_items": items,
                 "scene_classes": list(classes), "seq_len": 8 if str(items) == "1" else 24},
        "tokenizer": {"type": "word"},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "encoder_layers": 1, "patch_size": 16,
                  "absolute_positions": absolute, **(model or {})},
        "process": process,
        "train": {"batch_size": 32, "max_steps": steps, "lr": 3e-3, "warmup_steps": 20, "eval_every": 100000,
                  "save_every": 100000, "ema": 0.0, "cond_dropout": 0.1, **train}})


@pytest.fixture(scope="module", autouse=True)
def fmnist():
    try:
        load_fashion_mnist("test")
    except DiffLMError as e:
        pytest.skip(f"Fashion-MNIST is not installed here ({e}); apt-get install dataset-fashion-mnist")


class _Barely(dict):
    """Captioners after 2 training steps, each trained the first time a test asks for it."""

    def __init__(self, factory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, fam: str) -> DiffusionLM:
        d = self.factory.mktemp(f"cap-{fam}")
        Trainer(scenes_run(fam, 2, items="2-4", classes=("trouser", "bag", "sneaker")), d, progress=False).fit()
        self[fam] = DiffusionLM.from_pretrained(d, device="cpu")
        return self[fam]


@pytest.fixture(scope="module")
def barely(tmp_path_factory):
    """A captioner of any encoder-decoder family after 2 training steps (what is tested is the plumbing)."""
    return _Barely(tmp_path_factory)


def test_a_tiny_captioner_learns_single_item_class_captions(tmp_path):
    """400 steps (about 20 s): the plain-class caption of a single trouser or bag, from where it lies on the canvas
    and at either size, for ≥ 95% of test scenes (Fashion-MNIST test images the model never saw). The AR captioner
    knows its place from causality: no absolute positions (with them this run reaches 84% at 400 steps)."""
    Trainer(scenes_run("autoregressive", 400, absolute=False), tmp_path, progress=False).fit()
    lm = DiffusionLM.from_pretrained(tmp_path, device="cpu")
    scenes = scenes_for(lm.run.data, "test")
    outs = lm.caption([s.image for s in scenes], bf16=False, sampler_options={"greedy": True})
    m = caption_metrics([o.prediction for o in outs], scenes)
    assert m["exact"] >= 95.0, (m, [(o.prediction, s.captions) for o, s in zip(outs, scenes)][:8])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sampler_reads_one_fixed_encoding_of_the_image(barely, family):
    """Whatever the sampler does to the caption, every network call reads the same image states (the encoder's
    output for these images, computed once), and the images themselves come out untouched."""
    lm = barely[family]
    scenes = scenes_for(lm.run.data, "test")[:3]
    images = torch.tensor(np.stack([s.image for s in scenes])).float()[:, None] / 255
    with torch.no_grad():
        want = lm.model.encode_image(images, torch.zeros(3, dtype=torch.long)).states
    seen = []
    forward = lm.model.forward

    def spy(*args, memory=None, **kw):
        seen.append(memory.states)
        return forward(*args, memory=memory, **kw)

    names = [c.name for c in registry.samplers(lm.process.family) if c.fits(lm.process)]
    assert names
    lm.model.forward = spy
    try:
        for name in names:
            job = lm.prepare_captions([s.image for s in scenes], sampler=name, steps=4)
            before = job.cond.images.clone()
            seen.clear()
            try:
                lm._sample_job(job, batch_size=3, bf16=False, on_step=None)
            except DiffLMError as e:  # a sampler that does not fit this row layout says so in one line
                assert "\n" not in str(e)
                continue
            assert seen, name
            for s in seen:  # a sampler may call the network on some rows only (those still changing)
                assert all(any(torch.allclose(r.float(), w, atol=1e-5) for w in want) for r in s), name
            assert torch.equal(job.cond.images, before)
    finally:
        del lm.model.forward


@pytest.mark.parametrize("family,sampler", [("masked", "ancestral"), ("edit", "diffuser")])
def test_guidance_minus_one_is_the_model_without_the_image_and_captions_are_batch_invariant(barely, family, sampler):
    lm = barely[family]
    scenes = scenes_for(lm.run.data, "test")[:5]
    images = [s.image for s in scenes]
    blank = [np.zeros((64, 64), np.uint8)] * 5
    kw = {"sampler": sampler, "steps": 6, "seed": 3, "bf16": False}
    # the sampler sees the same logits either way: (1 + w)·cond − w·uncond at w = −1 is uncond
    assert [o.prediction for o in lm.caption(images, guidance=-1.0, **kw)] == \
        [o.prediction for o in lm.caption(blank, **kw)]
    one = [o.prediction for o in lm.caption(images, batch_size=1, **kw)]
    assert one == [o.prediction for o in lm.caption(images, batch_size=5, **kw)]
    with pytest.raises(DiffLMError, match="captions images"):
        lm.generate_targets(["a b"])


@pytest.mark.parametrize("family", ["editflow"])
def test_families_without_an_encoder_decoder_are_refused_in_one_line(family, tmp_path):
    with pytest.raises(DiffLMError, match="not supported by the"):
        Trainer(scenes_run(family, 2), tmp_path, progress=False).fit()


def test_caption_cli_reads_png_and_npy_and_bad_images_are_one_line_errors(barely, tmp_path, capsys):
    import json

    from difflm.cli import main

    lm = barely["masked"]
    run = tmp_path / "run"
    lm.save_pretrained(run)
    scene = scenes_for(lm.run.data, "test")[0]
    write_png(tmp_path / "scene.png", scene.image)
    np.save(tmp_path / "scene.npy", scene.image)
    rows = []
    for f in ("scene.png", "scene.npy"):
        assert main(["caption", str(run), str(tmp_path / f), "--json", "--sampler", "ancestral", "--steps", "4",
                     "--fp32"]) == 0
        rows += [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(tmp_path / "scene.png"), str(tmp_path / "scene.npy")]
    assert rows[0]["prediction"] == rows[1]["prediction"]  # the same pixels, the same seed: the same caption
    write_png(tmp_path / "small.png", np.zeros((32, 32), np.uint8))
    (tmp_path / "text.png").write_text("not an image")
    for bad, msg in ((tmp_path / "small.png", "is 32×32 pixels but this model reads 64×64"),
                     (tmp_path / "text.png", "is not a PNG image"), (tmp_path / "none.png", "cannot read")):
        assert main(["caption", str(run), str(bad)]) == 2
        err = capsys.readouterr().err
        assert one_line_error(err) and msg in err, err
    assert main(["sample", str(run), "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "difflm caption" in err


def test_masked_and_edit_captioners_start_from_the_ar_captioners_drafts(barely):
    """DiffusER's AR bootstrap for captions (``draft_from``). A masked captioner refines the AR captions by
    Mask-Predict: from iteration 99 of 100 it re-masks ⌊N/100⌋ = 0 of its N < 100 free positions, so the drafts come
    back unchanged, in 2 calls. An edit captioner's first revision reads the drafts. The drafts are the AR
    captioner's greedy captions, not samples of it."""
    ar, masked, edit = barely["autoregressive"], barely["masked"], barely["edit"]
    images = [s.image for s in scenes_for(ar.run.data, "test")[:4]]
    drafts = [o.prediction for o in ar.caption(images, bf16=False, sampler_options={"greedy": True})]
    assert all(drafts), drafts
    outs = masked.caption(images, draft_from=ar, steps=100, sampler_options={"start": 99}, bf16=False)
    assert [o.prediction for o in outs] == drafts and all(o.nfe == 2 for o in outs)
    with pytest.raises(DiffLMError, match="mask-predict"):
        masked.caption(images, draft_from=ar, sampler="ancestral")
    seen, forward = [], edit.model.forward

    def spy(x, *args, **kw):  # the input rows of every tagger call (head "aux"), in order
        if kw.get("head") == "aux":
            seen.append(x.clone())
        return forward(x, *args, **kw)

    edit.model.forward = spy
    try:
        edit.caption(images, draft_from=ar, steps=2, bf16=False)
    finally:
        del edit.model.forward
    tok = edit.tokenizer
    assert edit.process.sequences(seen[0]) == [tok.encode(d)[: edit.seq_len - 1] for d in drafts]


def test_sincos2d_adds_fixed_row_and_column_positions_to_the_patches():
    """model.image_positions sincos2d: the encoder's first block reads the stem's features plus the learned table
    plus MAE's fixed 2D table, whose first half depends on the patch's row only and second half on its column only;
    learned (the default) adds nothing more. An unknown value is a one-line config error."""
    from difflm.components import build_components
    from difflm.data.tokenizers import train_char
    from difflm.models.transformer import sincos_2d

    grid, d = 4, 64
    table = sincos_2d(grid, d)
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    for i in range(grid * grid):
        for j in range(grid * grid):
            assert torch.equal(table[i, : d // 2], table[j, : d // 2]) == bool(rows[i] == rows[j])
            assert torch.equal(table[i, d // 2 :], table[j, d // 2 :]) == bool(cols[i] == cols[j])
    images = torch.rand(3, 1, 64, 64)
    tok = train_char(["abc"])
    seen = {}
    for kind in ("learned", "sincos2d"):
        torch.manual_seed(0)
        model, _ = build_components(scenes_run("masked", 1, items="2-4", model={"image_positions": kind}), tok)
        hook = model.encoder[0].register_forward_pre_hook(lambda m, args, kind=kind: seen.__setitem__(kind, args[0]))
        model.eval().encode_image(images, torch.zeros(3, dtype=torch.long))
        hook.remove()
    torch.testing.assert_close(seen["sincos2d"] - seen["learned"], table.expand(3, -1, -1))
    with pytest.raises(DiffLMError, match="image_positions"):
        scenes_run("masked", 1, model={"image_positions": "fixed"})


def test_the_scene_stream_draws_row_r_of_the_run_as_scene_r(tmp_path):
    """data.scene_stream: the training batch of step s holds scenes s·B … s·B + B − 1, each with its first
    reference caption: the same images and captions the fixed set (written to and read back from the cache) holds
    at those indices, through the tokenizer; later steps move on to scenes no fixed set of data.scenes holds. A run
    trains on it end to end, and the option is refused in one line off the scenes corpus."""
    run = scenes_run("masked", 3, items="2-4", classes=("trouser", "bag", "sneaker"), cond_dropout=0.0)
    stream = RunConfig.from_dict({**run.to_dict(), "data": {**run.to_dict()["data"], "scene_stream": True}})
    tr = Trainer(stream, tmp_path / "s", progress=False)
    tok = build_tokenizer(stream.tokenizer, load_lines(stream.data, "train"))
    data = build_dataset(stream.data, tok, "train")
    assert data.stream is not None and build_dataset(stream.data, tok, "valid").stream is None
    B = stream.train.batch_size
    big = RunConfig.from_dict({**run.to_dict(), "data": {**run.to_dict()["data"], "scenes": 3 * B}})
    fixed = scenes_for(big.data, "train")
    for step in (0, 2):
        b = tr._batch(data, step, 0)
        assert b.rows.tolist() == list(range(step * B, step * B + B))
        for k, r in enumerate(b.rows.tolist()):
            sc = fixed[r]
            want = [tok.bos_id, *tok.encode(sc.captions[0])]
            assert b.tokens[k, : len(want)].tolist() == want
            assert b.tokens[k, len(want)] == tok.eos_id
        assert torch.equal(b.images, image_tensor(np.stack([fixed[r].image for r in b.rows.tolist()])))
    far = tr._batch(data, 10**6, 0)  # scene 32,000,000 and on: not in the 2,000-scene fixed set
    assert far.rows[0] == 10**6 * B and far.images.shape == (B, 1, 64, 64)
    # data.stream_start: the run's rows keep their numbers (the noise's counters), the scenes move on by B
    on = RunConfig.from_dict({**stream.to_dict(), "data": {**stream.to_dict()["data"], "stream_start": B}})
    later = build_dataset(on.data, tok, "train")
    b = Trainer(on, tmp_path / "on", progress=False)._batch(later, 1, 0)
    assert b.rows.tolist() == list(range(B, 2 * B))
    assert torch.equal(b.images, image_tensor(np.stack([fixed[2 * B + k].image for k in range(B)])))
    Trainer(stream, tmp_path / "run", progress=False).fit()
    assert DiffusionLM.from_pretrained(tmp_path / "run", device="cpu").caption([fixed[0].image])[0].prediction
    bad = {**run.to_dict(), "data": {"corpus": "ptb", "scene_stream": True}}
    with pytest.raises(DiffLMError, match="scene_stream"):
        RunConfig.from_dict(bad)
    with pytest.raises(DiffLMError, match="stream_start.*scene_stream true"):
        RunConfig.from_dict({**run.to_dict(), "data": {**run.to_dict()["data"], "stream_start": 4}})


def test_cell_and_patch_labels_follow_the_scene_graph_and_the_ink():
    """Scene.cell_labels names what each cell of the 2×2 grid holds (0: nothing, else 1 + size·10 + class), and
    patch_labels gives every patch of a raster (the image encoder's order) its cell's label: every patch with ink
    lies in a cell with an item, and the patches of a cell with an item carry that item's label, at any grid that
    splits into the cells. A grid that does not is refused."""
    from difflm.data.scenes import CLASSES, GRID, N_CELL_LABELS, SIZES, make_scenes, patch_labels

    scenes = make_scenes("test", 40, items="1-4", seed=5)
    cells = torch.from_numpy(np.stack([sc.cell_labels() for sc in scenes]))
    assert cells.shape == (40, GRID * GRID) and int(cells.max()) < N_CELL_LABELS
    for sc, row in zip(scenes, cells):
        held = {it.cell: it for it in sc.items}
        for cell in range(4):
            it = held.get(cell)
            want = 0 if it is None else 1 + SIZES.index(it.size) * len(CLASSES) + CLASSES.index(it.cls)
            assert int(row[cell]) == want
    for grid in (2, 4, 8):
        p = 64 // grid
        labels = patch_labels(cells, grid)
        assert labels.shape == (40, grid * grid)
        for k, sc in enumerate(scenes):
            for i in range(grid * grid):
                r, c = divmod(i, grid)
                patch = sc.image[r * p : (r + 1) * p, c * p : (c + 1) * p]
                cell = (r * p // 32) * 2 + c * p // 32  # the cell the patch's top-left pixel lies in
                assert int(labels[k, i]) == int(cells[k, cell])
                if patch.any():
                    assert int(labels[k, i]) != 0
    with pytest.raises(DiffLMError, match="patch grid"):
        patch_labels(cells, 3)


def test_the_scene_loss_teaches_the_image_encoder_what_each_cell_holds(tmp_path):
    """model.scene_loss: a head on the image encoder's patch states learns what each patch's cell holds. After 150
    steps of a tiny AR captioner on 1–2-item scenes, the head's argmax names the cell's content (nothing, or the
    item's size and class) for ≥ 85% of test patches (always "nothing": 60%; Fashion-MNIST test images); a run
    without the loss builds no head. The batches carry the labels (a row whose image classifier-free guidance
    drops holds nothing)."""
    from difflm.data.scenes import patch_labels

    run = scenes_run("autoregressive", 150, items="1-2", absolute=False, model={"scene_loss": 1.0})
    Trainer(run, tmp_path, progress=False).fit()
    lm = DiffusionLM.from_pretrained(tmp_path, device="cpu")
    scenes = scenes_for(lm.run.data, "test")[:100]
    images = image_tensor(np.stack([s.image for s in scenes]))
    with torch.no_grad():
        logits = lm.model.encode_image(images, torch.zeros(len(scenes), dtype=torch.long)).scene_logits
    want = patch_labels(torch.from_numpy(np.stack([s.cell_labels() for s in scenes])), 4)
    acc = (logits.argmax(-1) == want).float().mean().item()
    empty = (want == 0).float().mean().item()  # always answering "nothing"
    print(f"patch accuracy {acc:.3f}, always nothing {empty:.3f}")
    assert acc >= 0.85 > empty, (acc, empty)
    from difflm.components import build_components
    from difflm.data.tokenizers import train_char

    bare, _ = build_components(scenes_run("autoregressive", 1), train_char(["abc"]))
    assert not hasattr(bare, "scene_head")
    # the batches: labels beside the images; cond_dropout's dropped rows hold nothing
    tr = Trainer(scenes_run("masked", 1, items="2-4", cond_dropout=0.5), tmp_path / "drop", progress=False)
    tok = build_tokenizer(tr.run.tokenizer, load_lines(tr.run.data, "train"))
    b = tr._batch(build_dataset(tr.run.data, tok, "train"), 0, 0)
    blank = b.images.flatten(1).amax(-1) == 0
    assert blank.any() and (~blank).any()
    assert (b.image_labels[blank] == 0).all() and (b.image_labels[~blank] != 0).any(-1).all()


def test_the_scene_loss_is_refused_in_one_line_off_the_scenes_corpus():
    from difflm.components import build_components
    from difflm.data.tokenizers import train_char

    run = RunConfig.from_dict({"name": "x", "data": {"corpus": "ptb", "seq_len": 16},
                               "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "scene_loss": 1.0},
                               "process": {"type": "masked"}})
    with pytest.raises((DiffLMError, ValueError), match="scene_loss") as e:
        build_components(run, train_char(["abc"]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("patch", [8, 16])
def test_both_image_stems_cut_the_image_into_one_feature_per_patch(patch):
    """model.image_stem conv3 (default) and deep: (B, 1, 64, 64) -> one feature per patch of the (64/patch)² grid,
    whose feature depends only on the pixels of its own patch and the few around it (the stem's receptive field),
    not on a far corner; an unknown stem is a one-line config error."""
    from difflm.components import build_components
    from difflm.data.tokenizers import train_char

    for stem in ("conv3", "deep"):
        torch.manual_seed(0)
        model, _ = build_components(scenes_run("masked", 1, items="2-4",
                                               model={"image_stem": stem, "patch_size": patch}), train_char(["abc"]))
        x = torch.rand(2, 1, 64, 64)
        h = model.image_stem(x)
        assert h.shape == (2, 64, 64 // patch, 64 // patch)
        y = x.clone()
        y[:, :, -4:, -4:] = 0  # the bottom-right corner: only the last patch (and its neighbours') features move
        moved = (model.image_stem(y) - h).abs().amax((0, 1)) > 0
        assert moved[-1, -1] and not moved[0, 0]
    with pytest.raises(DiffLMError, match="image_stem"):
        scenes_run("masked", 1, model={"image_stem": "vgg"})


def test_image_positions_out_adds_the_fixed_2d_table_to_the_encoders_output():
    """model.image_positions_out: the encoder's output states are those of the same weights without it plus MAE's
    fixed 2D table (the scene head reads the states before it); without sincos2d positions it is refused."""
    from difflm.components import build_components
    from difflm.data.tokenizers import train_char
    from difflm.models.transformer import sincos_2d

    images, start = torch.rand(3, 1, 64, 64), torch.zeros(3, dtype=torch.long)
    out = {}
    for again in (False, True):
        torch.manual_seed(0)
        model, _ = build_components(scenes_run("masked", 1, items="2-4", model={
            "image_positions": "sincos2d", "image_positions_out": again, "scene_loss": 1.0}), train_char(["abc"]))
        with torch.no_grad():
            out[again] = model.eval().encode_image(images, start)
    torch.testing.assert_close(out[True].states - out[False].states, sincos_2d(4, 64).expand(3, -1, -1))
    torch.testing.assert_close(out[True].scene_logits, out[False].scene_logits)
    with pytest.raises((DiffLMError, ValueError), match="image_positions_out"):
        build_components(scenes_run("masked", 1, items="2-4", model={"image_positions_out": True}),
                         train_char(["abc"]))
