import subprocess
import sys

import pytest

from conftest import ROOT
from segdist.errors import UserError
from segdist.recipe import Recipe, dumps_toml, load_recipe, parse_override, resolve_recipe


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_shipped_demo_recipe_loads():
    r = load_recipe(ROOT / "recipes" / "shapes_unet.toml")
    assert r.model.arch == "unet" and r.model.encoder_weights is None and r.data.batch_size == 8


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "[train]\nsteps = 10\n")
    r = load_recipe(p, ["train.steps=20", "model.arch=FPN", "model.encoder_weights=null", "optim.lr=1e-2",
                        "data.crop=[48, 64]", "loss.terms=[{name = \"ce\", weight = 0.5}]"])
    assert r.train.steps == 20 and r.model.arch == "FPN" and r.model.encoder_weights is None
    assert r.optim.lr == 0.01 and r.data.crop == [48, 64] and r.loss.terms == [{"name": "ce", "weight": 0.5}]
    assert r.train.grad_accum == Recipe().train.grad_accum


def test_int_accepted_for_float(tmp_path):
    assert load_recipe(write(tmp_path, "[optim]\nlr = 1\n")).optim.lr == 1.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[train]\nstepz = 3\n", "train.stepz"),
        ("[trian]\nsteps = 3\n", "[trian]"),
        ("[train]\nsteps = \"ten\"\n", "train.steps"),
        ("[train]\nsteps = 1.5\n", "train.steps"),
        ("[data]\nbatch_size = true\n", "data.batch_size"),
        ("[train]\nprecision = \"fp61\"\n", "train.precision"),
        ("[data]\ncrop = 64\n", "data.crop"),
        ("[optim]\nlr = -1.0\n", "optim.lr"),
        ("[train\n", "not valid TOML"),
        ("[eval]\nmode = \"sliding\"\n", "eval.mode must be one of 'whole', 'slide', 'resize'"),
        ("[eval]\ncrop = [512, 512]\nstride = [600, 400]\n", "eval.stride [600, 400] is larger than eval.crop"),
        ("[eval]\nscales = [0.5, 0.0]\n", "eval.scales must be positive"),
        ("[eval]\ncrop = [512]\n", "eval.crop must be two positive integers"),
        ("[data]\nnum_workers = \"many\"\n", 'data.num_workers must be an integer or "auto"'),
        ("[data]\nnum_workers = \"null\"\n", 'data.num_workers must be an integer or "auto"'),
        ("[data]\nnum_workers = 1.5\n", 'data.num_workers must be an integer or "auto"'),
        ("[data]\nnum_workers = -1\n", 'data.num_workers must be an integer >= 0 or "auto"'),
        ("[train]\ninit_from = 5\n", "train.init_from must be a string (in quotes), got int 5"),
        ("[train]\ninit_from = \"\"\n", "train.init_from is empty"),
        ("[log]\ntrackers = [\"tensorboard\", \"mlfow\"]\n", "log.trackers: unknown tracker 'mlfow'; known: tensorboard, wandb"),
        ("[log]\ntrackers = \"mlflow\"\n", "log.trackers must be a list"),
        ("[log]\ntrackers = [\"mlflow\", \"mlflow\"]\n", "log.trackers lists 'mlflow' twice"),
        ("[log]\nproject = \" \"\n", "log.project is empty"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, needle):
    with pytest.raises(UserError, match=None) as err:
        load_recipe(write(tmp_path, text))
    assert needle in str(err.value)


def test_nested_overrides_change_one_entry_of_a_table(tmp_path):
    base = ROOT / "recipes" / "cityscapes_deeplabv3plus_r50.toml"
    before = load_recipe(base).data.augment_args
    r = load_recipe(base, ["data.augment_args.scale=[0.75, 1.5]", "model.arch_args.deep.er=3",
                           "data.augment_args.hue=0.1"])
    assert r.data.augment_args == {**before, "scale": [0.75, 1.5], "hue": 0.1}
    assert r.model.arch_args["deep"] == {"er": 3}  # created at any depth (the model builder checks the names)
    with pytest.raises(UserError, match=r"data.augment_args.hue is 0.05, not a table.*--set data.augment_args.hue="):
        load_recipe(base, ["data.augment_args.hue.x=1"])
    with pytest.raises(UserError, match="train.steps"):
        load_recipe(base, ["train.steps.x=1"])


def test_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("steps=3")


def test_round_trip(tmp_path):
    r = load_recipe(ROOT / "recipes" / "shapes_unet.toml", ["model.encoder_weights=imagenet"])
    again = load_recipe(write(tmp_path, dumps_toml(r)))
    assert again == r


def test_the_python_api_takes_a_path_or_a_recipe_with_overrides_on_top():
    base = ROOT / "recipes" / "cityscapes_deeplabv3plus_r50.toml"
    sets = ["train.steps=7", "data.augment_args.scale=[0.75, 1.5]"]
    loaded = load_recipe(base)
    assert resolve_recipe(loaded) is loaded and resolve_recipe(str(base)) == loaded
    assert resolve_recipe(loaded, sets) == resolve_recipe(base, sets) == load_recipe(base, sets) != loaded
    assert resolve_recipe(loaded, "train.steps=7") == load_recipe(base, ["train.steps=7"])  # one string, one override
    with pytest.raises(UserError, match="unknown key train.stepz"):
        resolve_recipe(loaded, ["train.stepz=7"])
    with pytest.raises(UserError, match=r"overrides must be 'section.key=value' strings .*got tuple \('train', 7\)"):
        resolve_recipe(base, [("train", 7)])
    with pytest.raises(UserError, match="recipe must be the path of a .toml recipe or a segdist.recipe.Recipe, got int 3"):
        resolve_recipe(3)


@pytest.mark.parametrize(
    "args, needle",
    [(["--set", "train.stepz=3"], "train.stepz"), (["--set", "train.steps=abc"], "train.steps")],
)
def test_cli_exit_2_one_line(args, needle):
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), str(ROOT / "recipes" / "shapes_unet.toml"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_precision_defaults_to_auto():
    from segdist.recipe import TrainConfig

    assert TrainConfig().precision == "auto"


def test_num_workers_takes_auto_from_the_file_and_from_set(tmp_path):
    from segdist.recipe import DataConfig

    assert DataConfig().num_workers == "auto"
    assert load_recipe(write(tmp_path, "[data]\nnum_workers = 3\n")).data.num_workers == 3
    r = load_recipe(write(tmp_path, "[data]\nnum_workers = 3\n"), ["data.num_workers=auto"])
    assert r.data.num_workers == "auto"
    assert load_recipe(write(tmp_path, dumps_toml(r))) == r  # written back as the string
    assert load_recipe(write(tmp_path, "[data]\nnum_workers = 0\n"), ['data.num_workers="auto"']).data.num_workers == "auto"
    with pytest.raises(UserError, match='data.num_workers must be an integer or "auto", got str \'Auto\''):
        load_recipe(write(tmp_path, ""), ["data.num_workers=Auto"])
    with pytest.raises(UserError, match="data.num_workers"):
        DataConfig(num_workers="many")  # built in code, not loaded: the same check


def test_fetch_timeout_is_a_positive_number_of_seconds(tmp_path):
    assert load_recipe(write(tmp_path, ""), ["data.fetch_timeout=5"]).data.fetch_timeout == 5
    for bad in ("0", "-1.5"):
        with pytest.raises(UserError, match="data.fetch_timeout must be a number of seconds > 0"):
            load_recipe(write(tmp_path, ""), [f"data.fetch_timeout={bad}"])


def test_optional_keys_still_take_null(tmp_path):
    r = load_recipe(write(tmp_path, "[eval]\ncrop = \"null\"\n"), ["model.classes=none"])
    assert r.eval.crop is None and r.model.classes is None


def test_init_from_is_a_path_or_null(tmp_path):
    assert load_recipe(write(tmp_path, "")).train.init_from is None
    step = "runs/a/checkpoints/step-8"
    r = load_recipe(write(tmp_path, "[train]\ninit_from = \"null\"\n"), [f"train.init_from={step}"])
    assert r.train.init_from == step
    assert load_recipe(write(tmp_path, dumps_toml(r))) == r
