from dataclasses import dataclass, field

import pytest
import yaml

from omnimask.config import DataConfig, check_fields, check_override, load_config, save_config
from omnimask.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    layers: int = 4


@dataclass
class Root:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_layers_defaults_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"name": "from-yaml", "inner": {"layers": 8}}))
    cfg = load_config(Root, p, ["inner.lr=0.5", "tags=[a,b]"])
    assert isinstance(cfg, Root) and isinstance(cfg.inner, Inner)
    assert (cfg.name, cfg.inner.layers, cfg.inner.lr, cfg.tags) == ("from-yaml", 8, 0.5, ["a", "b"])


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  layerz: 3\n")
    with pytest.raises(ConfigError, match=r"inner\.layerz"):
        load_config(Root, p)
    with pytest.raises(ConfigError, match="nope"):
        load_config(Root, None, ["nope=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"inner\.layers"):
        load_config(Root, None, ["inner.layers=many"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(DataConfig, None, ["batch_size=big"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Root, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Root, None, ["justakey"])


def test_resolved_config_written_and_reloadable(tmp_path):
    cfg = load_config(Root, None, ["inner.layers=2"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(Root, path)
    assert again == cfg


@dataclass
class Checked:
    size: int = 4
    rate: float = 0.1

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "size")
        check_fields(self, "[0,1)", "rate")


@dataclass
class Outer:
    inner: Checked = field(default_factory=Checked)
    count: int = 1

    def __post_init__(self) -> None:
        check_fields(self, ">=0", "count")


def test_range_errors_name_the_full_key():
    # the innermost failing dataclass is found and its path put in front of its field
    with pytest.raises(ConfigError, match=r"config error: inner\.size must be >= 1, got 0$"):
        load_config(Outer, None, ["inner.size=0"])
    with pytest.raises(ConfigError, match=r"inner\.rate must be in \[0, 1\), got 1\.0"):
        load_config(Outer, None, ["inner.rate=1.0"])
    with pytest.raises(ConfigError, match=r"inner\.rate must be in \[0, 1\), got nan"):
        load_config(Outer, None, ["inner.rate=nan"])
    with pytest.raises(ConfigError, match=r"config error: count must be >= 0, got -1$"):
        load_config(Outer, None, ["count=-1"])
    assert load_config(Outer, None, ["inner.size=1", "inner.rate=0"]).inner.size == 1


@pytest.mark.parametrize("ov", ["inner.lay-ers=3", "inner..layers=3", "=3", "inner.layers",
                                "1x=2", " inner.layers=3"])
def test_malformed_overrides_are_named(ov):
    with pytest.raises(ConfigError, match="is not of the form key=value") as e:
        load_config(Root, None, [ov])
    assert repr(ov) in str(e.value)
    check_override("inner.layers=3")  # well formed: no error


def test_a_mapping_override_replaces_a_free_form_mapping():
    from omnimask.train.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, "shapes_tiny", ["objectives.mix={mlm: 1, itc: 2}"])
    assert cfg.objectives.mix == {"mlm": 1.0, "itc": 2.0}  # the rest of the file's mix dropped
    full = load_config(PretrainConfig, "shapes_tiny").objectives.mix
    one = load_config(PretrainConfig, "shapes_tiny", ["objectives.mix.mlm=5"]).objectives.mix
    assert one == {**full, "mlm": 5.0}  # a dotted key still sets one entry
    t = load_config(PretrainConfig, "shapes_tiny", ["trainer={lr: 0.5}"]).trainer
    assert t.lr == 0.5 and t.max_steps == load_config(PretrainConfig, "shapes_tiny"
                                                      ).trainer.max_steps  # a block merges
    with pytest.raises(ConfigError, match="objectives.mix.mlm"):
        load_config(PretrainConfig, "shapes_tiny", ["objectives.mix={mlm: x}"])


@pytest.mark.parametrize("ov,msg", [("vqa_init=scratch", r"vqa_init must be multitask\|"
                                     "pretrained, got 'scratch'"),
                                    ("segment_init=vqa", r"segment_init must be chain\|"
                                     "pretrained"),
                                    ("finetune_final_steps=-1", "finetune_final_steps must "
                                     "be >= 0"),
                                    ("precision=fp16", r"precision must be fp32\|bf16\|"
                                     "auto"),
                                    ("run_settings={vqa2: [trainer.lr=1]}",
                                     "run_settings: no task run named 'vqa2'"),
                                    ("run_settings={vqa: [trainer.lr]}",
                                     "run_settings.vqa: settings are key=value"),
                                    ("vq_crop=36", "vq_crop must be 0 or a multiple of 8"),
                                    ("vq_crop=72", "up to image_size 64, got 72")])
def test_demo_chain_settings_are_checked(ov, msg):
    from omnimask.config import DemoConfig

    with pytest.raises(ConfigError, match=msg):
        load_config(DemoConfig, None, [ov])
    assert load_config(DemoConfig, None, ["finetune_final_steps=0"]).segment_init == "pretrained"



# every setting that takes one of a few values, checked by check_choice: (config, field,
# where the error says it sits)
CHOICES = [
    ("model:ModelConfig", "image_input", "model."),
    ("model:ModelConfig", "image_code_input", "model."),
    ("modalities.image.vq:VQConfig", "quantizer", ""),
    ("modalities.image.vq:VQConfig", "downsample", ""),
    ("modalities.image.tokenizer:ImageTokenizerConfig", "parallel", ""),
    ("modalities.image.encoder:ImageEncoderConfig", "norm", ""),
    ("modalities.speech.tokenizer:SpeechTokenizerConfig", "kind", ""),
    ("heads.segmentation:SegmentHeadConfig", "class_pool", ""),
    ("heads.vqa:VQAHeadConfig", "loss", "heads.vqa."),
    ("heads.retrieval:RetrievalHeadConfig", "features", ""),
    ("train.encoder_warmup:EncoderWarmupConfig", "tags", "encoder_warmup."),
    ("train.tasks.caption:CaptionConfig", "tokenizer", ""),
    ("train.evaluate_generate:GenerateEvalConfig", "rerank", ""),
    ("train.evaluate_generate:GenerateEvalConfig", "sampler", ""),
    ("train.pretrain:PretrainData", "features", "data."),
    ("train.pretrain:GenerateConfig", "rerank", ""),
    ("train.pretrain:GenerateConfig", "sampler", ""),
    ("train.objectives.base:ObjectivesConfig", "itm_features", ""),
    ("train.finetune:FinetuneConfig", "task", ""),
    ("fusion.trunk:TrunkConfig", "norm", "model.trunk."),
    ("fusion.trunk:TrunkConfig", "activation", "model.trunk."),
    ("fusion.trunk:TrunkConfig", "attention_backend", "model.trunk."),
]


@pytest.mark.parametrize("where,name,prefix", CHOICES, ids=[f"{w.split(':')[1]}.{n}"
                                                             for w, n, _ in CHOICES])
def test_a_choice_outside_its_values_is_refused_by_name(where, name, prefix):
    """Each choice setting's default is accepted and any other value is refused with one
    line naming the setting, every allowed value and the value given."""
    import importlib
    import re

    module, cls = where.split(":")
    cfg = getattr(importlib.import_module(f"omnimask.{module}"), cls)
    cfg()  # the defaults hold
    with pytest.raises(ValueError) as e:
        cfg(**{name: "zzq"})
    msg = str(e.value)
    assert re.search(rf"{re.escape(prefix)}{name} must be \w+(\|\w+)+, got 'zzq'", msg), msg
    assert "\n" not in msg


def test_check_choice_names_the_field_and_joins_the_values():
    @dataclass
    class C:
        size: int = 2

    from omnimask.config import check_choice

    check_choice(C(), "size", (2, 3))
    with pytest.raises(ValueError, match=r"^x\.size must be 2\|3, got 5$"):
        check_choice(C(5), "size", (2, 3), prefix="x.")
