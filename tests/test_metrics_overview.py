"""The rank overview: the grid of blocks × projection types, per-type aggregates, card thinning, the
custom-scalars layout and the decision table — as pure functions and read back from a real run's
TensorBoard event files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from tsvd.controller import RankChange
from tsvd.plots import GRID_FONT_PT, figure_rgb, grid_figure
from tsvd.rank_overview import LayerGrid, aggregates, card_layers, custom_layout, decision_table
from tsvd.trainer import train

TYPES = {"attn": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"]}


def llama_layers(blocks: int) -> list[str]:
    return [f"layers.{i}.{part}.{t}" for i in range(blocks) for part, ts in TYPES.items() for t in ts]


def test_grid_places_blocks_and_types():
    grid = LayerGrid.of(["tok_emb", *llama_layers(2), "lm_head"])
    assert grid.rows == ["0", "1", "tok_emb", "lm_head"]
    assert grid.types == ["tok_emb", "q", "k", "v", "o", "gate", "up", "down", "lm_head"]
    assert grid.cell["layers.1.mlp.up"] == (1, 6) and grid.cell["lm_head"] == (3, 8)
    assert grid.layers_of("o") == ["layers.0.attn.o", "layers.1.attn.o"]
    hf = LayerGrid.of(["model.layers.10.self_attn.q_proj", "model.layers.2.self_attn.q_proj"])
    assert hf.rows == ["2", "10"] and hf.types == ["q_proj"]


def test_card_thinning():
    layers = [*llama_layers(80), "lm_head"]
    assert card_layers(layers, "all") == layers and card_layers(layers, "none") == []
    blocks = lambda names: sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
    assert blocks(card_layers(layers, "every:20")) == [0, 20, 40, 60, 79]
    auto = card_layers(layers, "auto")
    assert blocks(auto) == [0, 10, 20, 30, 40, 50, 60, 70, 79] and "lm_head" in auto
    assert card_layers(llama_layers(4), "auto") == llama_layers(4)  # small models keep every card


def test_aggregates_by_hand():
    ranks = {"layers.0.attn.q": 4, "layers.1.attn.q": 8, "layers.0.mlp.up": 2}
    dims = {"layers.0.attn.q": (16, 16), "layers.1.attn.q": (16, 16), "layers.0.mlp.up": (32, 16)}
    kept = {"layers.0.attn.q": 0.9, "layers.1.attn.q": 0.7, "layers.0.mlp.up": 1.0}
    out = aggregates(ranks, dims, kept, other_params=100)
    assert out["rank/q/mean"] == 6 and out["rank/q/min"] == 4 and out["rank/q/max"] == 8
    assert out["params/q/ratio"] == pytest.approx((4 + 8) * 33 / (2 * 256))
    assert out["params/up/ratio"] == pytest.approx(2 * 49 / 512)
    assert out["energy/q/mean"] == pytest.approx(0.8) and out["energy/up/mean"] == 1.0
    assert out["params/ratio"] == pytest.approx((100 + 12 * 33 + 2 * 49) / (100 + 2 * 256 + 512))


def test_decision_table_prefers_the_change_s_own_reason():
    changes = [RankChange("layers.0.attn.q", 8, 12, 1.0, 1.0), {"layer": "layers.1.mlp.up", "old": 8, "new": 5,
                                                                  "reason": "energy 0.95 kept by 5"}]
    text = decision_table(30, changes, {"layers.0.attn.q": "tail share 0.100", "layers.1.mlp.up": "unused"})
    lines = text.splitlines()
    assert lines[0].startswith("**rank decision at step 30**: 2 layer(s)")
    assert "| layers.0.attn.q | 8 → 12 | tail share 0.100 |" in lines
    assert "| layers.1.mlp.up | 8 → 5 | energy 0.95 kept by 5 |" in lines


def test_eighty_blocks_stay_legible():
    """Every one of 560 cells holds its number inside the cell at a readable size."""
    layers = llama_layers(80)
    grid = LayerGrid.of(layers)
    rng = np.random.default_rng(0)
    values = {n: float(v) for n, v in zip(layers, rng.random(len(layers)))}
    fig = grid_figure(grid, values, {n: str(int(128 * v)) for n, v in values.items()}, "rank", "rank / max rank")
    image = figure_rgb(fig)
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    assert len(texts) == 560 and GRID_FONT_PT >= 7
    renderer = fig.canvas.get_renderer()
    cell_h = ax.get_window_extent(renderer).height / 80
    cell_w = ax.get_window_extent(renderer).width / 7
    assert cell_h >= 15  # pixels per block row
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.height < cell_h and box.width < cell_w, t.get_text()
    assert image.shape[0] >= 80 * 15 and image.shape[2] == 3


def custom_scalars(events: EventAccumulator) -> layout_pb2.Layout:
    (event,) = events.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


def texts(events: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
            for e in events.Tensors(f"{tag}/text_summary")]


ADAPTIVE = ("train.steps=12", "train.log_interval=4", "train.eval_interval=100", "train.checkpoint_interval=100",
            "rank.policy=energy", "rank.warmup_steps=5", "rank.interval=5", "rank.energy=0.9")


def test_a_run_writes_the_overview(tiny_config):
    cfg = tiny_config(*ADAPTIVE)
    train(cfg, progress=False)
    events = EventAccumulator(f"{cfg.out_dir}/tb", size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()

    for tag in ("overview/rank", "overview/energy_kept"):  # at the start, each decision (5, 10) and the end
        shots = events.Images(tag)
        assert [e.step for e in shots] == [0, 5, 10, 12], tag
        from PIL import Image
        png = Image.open(io.BytesIO(shots[-1].encoded_image_string))
        assert png.format == "PNG" and png.size == (shots[-1].width, shots[-1].height) and png.height > 100

    scalars = set(tags["scalars"])
    for t in ("q", "k", "v", "o", "gate", "up", "down"):
        for tag in (f"rank/{t}/mean", f"rank/{t}/min", f"rank/{t}/max", f"params/{t}/ratio", f"energy/{t}/mean"):
            assert tag in scalars, tag
    ratio = events.Scalars("params/ratio")
    assert 0 < ratio[0].value < 1 and ratio[0].step == 0
    q_mean = {e.step: e.value for e in events.Scalars("rank/q/mean")}
    assert q_mean[0] == 8 and q_mean[12] != 8  # ranks started at 8 and moved

    layout = custom_scalars(events)
    titles = [c.title for c in layout.category]
    assert titles == ["model", "type q", "type k", "type v", "type o", "type gate", "type up", "type down"]
    q_charts = {ch.title: list(ch.multiline.tag) for ch in layout.category[1].chart}
    assert q_charts["q: rank of every layer"] == [r"^spectral/rank/(.*\.)?q$"]
    assert q_charts["q: rank mean, min, max"] == ["^rank/q/(mean|min|max)$"]
    model_tags = [t for ch in layout.category[0].chart for t in ch.multiline.tag]
    assert "^params/ratio$" in model_tags and "^perf/retraction_share$" in model_tags and "^train/loss$" in model_tags

    decisions = texts(events, "rank_decision")  # step 10 changed nothing (no shrink right after a growth)
    assert [step for step, _ in decisions] == [5]
    step, table = decisions[0]
    assert "| layers.0.attn.q | 8 → " in table and "tail share" in table


def test_layer_cards_none_keeps_aggregates_and_images(tiny_config):
    cfg = tiny_config(*ADAPTIVE, "train.layer_cards=none", "train.steps=6")
    train(cfg, progress=False)
    events = EventAccumulator(f"{cfg.out_dir}/tb", size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert not [t for t in scalars if t.startswith("spectral/rank/")]
    assert not events.Tags()["histograms"]
    assert "rank/q/mean" in scalars and "params/ratio" in scalars and "spectral/total_rank" in scalars
    assert [e.step for e in events.Images("overview/rank")] == [0, 5, 6]


def test_custom_layout_lists_every_type_even_without_cards():
    layout = custom_layout(["layers.0.attn.q", "lm_head"])
    assert list(layout) == ["model", "type q", "type lm_head"]


def test_tensorboard_shows_the_overview_in_a_headless_browser(tiny_config, tmp_path):
    """TensorBoard's own page for a run, rendered by headless Chromium: the Images tab shows the
    overview (viridis cells), the Custom Scalars tab draws the layout's charts (TensorBoard's line
    colour). Skipped where Chromium is not installed (``apt-get install chromium``)."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from PIL import Image

    from killable import kill_tree
    from tsvd.distributed import free_port

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs chromium")
    cfg = tiny_config(*ADAPTIVE, "train.steps=6")
    train(cfg, progress=False)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", f"{cfg.out_dir}/tb", "--port",
                               str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout") as r:
                    if b"type q" in r.read():
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not serve the layout"
            time.sleep(0.5)

        def screenshot(tab: str) -> np.ndarray:
            png = tmp_path / f"{tab}.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--window-size=1400,1600", "--virtual-time-budget=20000", f"--screenshot={png}",
                            f"http://127.0.0.1:{port}/#{tab}"], capture_output=True, timeout=180, check=True)
            return np.asarray(Image.open(png).convert("RGB")).astype(int)[100:]  # below the header bar

        from matplotlib import colormaps

        viridis = (colormaps["viridis"](np.linspace(0, 1, 64))[:, :3] * 255).astype(int)
        body = screenshot("images").reshape(-1, 3)
        coloured = body[np.ptp(body, axis=1) > 40]  # not grey / white
        near = np.abs(coloured[:, None, :] - viridis[None]).sum(-1).min(1) < 30
        assert near.sum() > 500, near.sum()  # the overview's cells and colour bar
        lines = np.abs(screenshot("custom_scalars").reshape(-1, 3) - [255, 112, 67]).sum(1) < 30
        assert lines.sum() > 1000, lines.sum()  # chart lines of the custom layout
    finally:
        kill_tree(server)
