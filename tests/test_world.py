"""The tiny world: sampling, rendering, and the round trips scene <-> description <-> code."""

import random

import numpy as np
import pytest

from viscodex_lite import world
from viscodex_lite.world import Scene


def some_scenes(n=200, seed=0):
    return world.sample_scenes(seed, n // 2, split="train") + world.sample_scenes(seed, n // 2, split="test")


def test_sampling_is_seeded_and_split_is_disjoint():
    assert world.sample_scenes(3, 20) == world.sample_scenes(3, 20)
    assert world.sample_scenes(3, 20) != world.sample_scenes(4, 20)
    train = set(world.sample_scenes(0, 2000, split="train"))
    test = set(world.sample_scenes(0, 200, split="test"))
    assert not train & test
    assert all(world.is_held_out(s) for s in test)
    # held-out share is about 10% of all scenes
    rng = random.Random(1)
    share = np.mean([world.is_held_out(world.sample_scene(rng)) for _ in range(3000)])
    assert 0.07 < share < 0.13


def test_sampler_covers_the_vocabulary():
    scenes = world.sample_scenes(0, 600)
    colours = {c for s in scenes if s.kind == "chart" for c, _ in s.items}
    elements = {e for s in scenes if s.kind == "ui" for e, _ in s.items}
    assert colours == set(world.COLOURS) and elements == set(world.ELEMENT_TAGS)
    assert {len(s.items) for s in scenes} == {1, 2, 3, 4}
    assert world.sample_scenes(0, 5, kind="ui", n_items=2)[0].kind == "ui"


@pytest.mark.parametrize("bad", [
    ("chart", (("red", 0),)), ("chart", (("crimson", 3),)), ("ui", (("table", "red"),)),
    ("chart", ()), ("chart", (("red", 1),) * 5), ("pie", (("red", 1),)),
])
def test_invalid_scenes_are_rejected(bad):
    with pytest.raises(world.SceneError):
        Scene(*bad)


def test_description_round_trip():
    for scene in some_scenes():
        assert world.parse_description(world.describe(scene)) == scene
    for junk in ["", "bar chart:", "bar chart: red", "bar chart: red 3,blue 5", "page: header", "page: header crimson",
                 "bar chart: #0 red 3, #1 blue 5, #2 red 1, #3 red 2, #4 red 4", "bar chart: red 3, blue 5",
                 "bar chart: #1 red 3", "bar chart: #0 red 3,#1 blue 5"]:
        assert world.parse_description(junk) is None, junk


def test_code_round_trip_static_and_executed():
    scenes = some_scenes(100)
    programs = [world.to_code(s) for s in scenes]
    assert all(world.parse_code(p) == s for p, s in zip(programs, scenes))
    assert all(world.check_programs(programs, scenes))
    assert all(world.check_programs(programs, scenes, execute=False))
    charts = [p for p in programs if world.code_kind(p) == "chart"]
    assert world.run_chart_programs(charts) == [s for s in scenes if s.kind == "chart"]


def test_wrong_programs_fail():
    scene = Scene("chart", (("red", 3), ("blue", 5)))
    good = world.to_code(scene)
    wrong = [
        good.replace("e22", "23e"),  # wrong colour code
        good.replace("ylim(6)", "ylim(5)"),  # wrong derived quantity
        good.replace("bar(1,", "bar(2,"),  # wrong slot
        good.replace("bar(1, 5", "bar(1, 4"),  # wrong height
        good + "\nbar(2, 1, '#e22')",  # extra bar (and ylim then not last is fine, but scene differs)
        "bar(0, 3, '#e22'",  # syntax error
        "import os\nbar(0, 3, '#e22')\nylim(4)",  # no imports in the runner's namespace
        "while True:\n    pass",  # timeout
    ]
    assert world.check_programs(wrong, [scene] * len(wrong)) == [False] * len(wrong)
    ui = Scene("ui", (("header", "red"), ("text", "yellow")))
    ui_wrong = [world.to_code(ui).replace("<p", "<h1").replace("</p>", "</h1>"), "<div>", "<h1 style='color:#000'>"]
    assert world.check_programs(ui_wrong, [ui] * 3) == [False] * 3


def test_executed_programs_may_compute():
    # the runner really executes: a loop that draws the right bars passes, its static reading does not
    scene = Scene("chart", (("red", 2), ("red", 2)))
    program = "for i in range(2):\n    bar(i, 2, '#e22')\nylim(3)"
    assert world.check_programs([program], [scene]) == [True]
    assert world.parse_code(program) is None


def test_render_draws_the_facts():
    chart = Scene("chart", (("red", 3), ("purple", 9)))
    px = np.asarray(world.render(chart))
    assert px.shape == (64, 64, 3)
    assert tuple(px[63, 8]) == world.rgb("red") and tuple(px[64 - 18, 8]) == world.rgb("red")
    assert tuple(px[64 - 19, 8]) == (255, 255, 255)  # bar 0 is exactly 3 units = 18 px tall
    assert tuple(px[64 - 54, 24]) == world.rgb("purple")
    assert tuple(px[63, 40]) == (255, 255, 255)  # no third bar
    ui = Scene("ui", (("header", "red"), ("button", "blue"), ("input", "cyan"), ("text", "black")))
    px = np.asarray(world.render(ui))
    assert tuple(px[8, 2]) == world.rgb("red")
    assert tuple(px[16 + 8, 32]) == world.rgb("blue") and tuple(px[16 + 8, 2]) == (255, 255, 255)
    assert tuple(px[32 + 3, 30]) == world.rgb("cyan") and tuple(px[32 + 8, 30]) == (255, 255, 255)
    assert tuple(px[48 + 4, 10]) == world.rgb("black")
    # every scene renders differently from a scene with one fact changed
    other = Scene("chart", (("red", 3), ("purple", 8)))
    assert not np.array_equal(np.asarray(world.render(chart)), np.asarray(world.render(other)))


def test_item_accuracy():
    t = Scene("chart", (("red", 3), ("blue", 5)))
    assert world.item_accuracy(t, t) == 1.0
    assert world.item_accuracy(None, t) == 0.0
    assert world.item_accuracy(Scene("chart", (("red", 3),)), t) == 0.5
    assert world.item_accuracy(Scene("ui", (("header", "red"),)), t) == 0.0


def test_shuffled_style_sheet_keeps_structure_but_not_codes():
    scene = Scene("chart", (("red", 3), ("blue", 5)))
    palette, tags = world.shuffled_tables(random.Random(3))
    program = world.to_code(scene, palette, tags)
    assert program.splitlines()[0] == world.to_code(scene).splitlines()[0]  # same spec comment
    assert program.splitlines()[-1] == "ylim(6)"  # same derived quantity
    drawn = world.parse_code(program)
    assert drawn is not None and [h for _, h in drawn.items] == [3, 5]  # a valid program of the same shape...
    assert world.parse_code(world.to_code(scene, world.COLOURS, world.ELEMENT_TAGS)) == scene
    # ...whose colours follow the shuffled table, so it draws another scene unless the shuffle fixed them
    assert (drawn == scene) == all(palette[c] == world.COLOURS[c] for c, _ in scene.items)
    assert len({tuple(world.shuffled_tables(random.Random(s))[0].values()) for s in range(5)}) == 5
