"""train.py --lora_rank: a peft LoRA adapter of a model, saved, reloaded in a fresh process, merged, resumed."""

import json
import subprocess
import sys

import pytest
import torch
from accelerate import PartialState
from conftest import REPO_ROOT
from PIL import Image, ImageChops
from safetensors.torch import load_file
from test_train import run_train, step_losses, two_cpu_processes, validation_records

from pipeline_engraving import EngravingPipeline
from train import PRIOR_IMAGE_FIRST_SEED, draw_prior_images, parse_args


# High learning rates, so that three steps move the adapter (its B matrices start at zero) well away from the base.
LORA_FLAGS = [
    "--lora_rank",
    "4",
    "--generator_learning_rate",
    "1e-2",
    "--learning_rate",
    "1e-2",
    "--lr_scheduler",
    "constant",
]

# Loads the base model as the Hub would (AutoModel, trust_remote_code) and the adapter with peft, in a fresh process:
# the seed samples' grid, the generator's and the caption decoder's outputs, adapted, merged and merged-then-reloaded.
RELOAD_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer
from pipeline_engraving import EngravingPipeline, captioned_grid

base_dir, adapter_dir, merged_dir, out = sys.argv[1:]
pipe = EngravingPipeline.from_pretrained(base_dir, adapter_id=adapter_dir)
samples = pipe(seeds=range(2), batch_size=8)
captioned_grid(samples.images, samples.captions, columns=2).save(out + ".png")

latents = torch.randn(3, pipe.model.config.latent_size, generator=torch.Generator().manual_seed(0))
tokens = torch.randint(0, pipe.model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))

def outputs(model):
    with torch.no_grad():
        return [model.generator(latents), model.caption_decoder(latents, model.token_embedding(tokens))]

base = AutoModel.from_pretrained(base_dir, trust_remote_code=True).eval()
results = {"base": outputs(base)}
adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
results["adapted"] = outputs(adapted)
merged = adapted.merge_and_unload()
results["merged"] = outputs(merged)
merged.save_pretrained(merged_dir)
AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged_dir)
results["merged_reloaded"] = outputs(AutoModel.from_pretrained(merged_dir, trust_remote_code=True).eval())
results["merged_keys"] = sorted(AutoModel.from_pretrained(merged_dir, trust_remote_code=True).state_dict())
torch.save(results, out + ".pt")
"""


@pytest.fixture(scope="module")
def lora_run(tiny_dataset_dir, tiny_model_dir, tmp_path_factory):
    """A rank-4 adapter of the tiny model trained for 3 steps (one epoch, one evaluation) on the tiny shapes."""
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run_train(
        tiny_dataset_dir, output_dir, "--base_model", str(tiny_model_dir), "--max_train_steps", "3", *LORA_FLAGS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_lora_run_saves_only_the_adapter_of_the_generator_convolutions_and_caption_attention(lora_run, tiny_model_dir):
    model_dir = lora_run / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and not (model_dir / "model.safetensors").exists()
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    targets = set(adapter_config["target_modules"])
    assert "caption_decoder.layers.0.attention.qkv" in targets and "generator.to_grey" in targets
    assert not any(name.startswith(("image_encoder", "text_encoder")) or "mlp" in name for name in targets)
    weights = load_file(model_dir / "adapter_model.safetensors")
    assert weights and all("lora_A" in name or "lora_B" in name for name in weights)
    card = (model_dir / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "rank-4 LoRA adapter" in card and "val_loss_caption" in card
    assert (model_dir / "samples.png").is_file() and (lora_run / "samples-0000003.png").is_file()


def test_lora_adapter_reloads_in_a_fresh_process_and_merges_to_the_same_model(lora_run, tiny_model_dir, tmp_path):
    command = [sys.executable, "-c", RELOAD_SCRIPT, str(tiny_model_dir), str(lora_run / "model")]
    command += [str(tmp_path / "merged"), str(tmp_path / "reloaded")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    # The fresh process draws and captions seeds exactly as the training process did when it saved the adapter: the
    # adapter holds everything that trained, and the base model's BatchNorm statistics did not move.
    trained = Image.open(lora_run / "model" / "samples.png").convert("RGB")
    reloaded = Image.open(tmp_path / "reloaded.png").convert("RGB")
    assert ImageChops.difference(trained, reloaded).getbbox() is None

    results = torch.load(tmp_path / "reloaded.pt")
    for base, adapted in zip(results["base"], results["adapted"]):
        # The adapter changed both the drawing and the caption logits (the tiny random generator draws near zero).
        assert (base - adapted).abs().max() > 0.1 * base.abs().max()
    for name in ("merged", "merged_reloaded"):
        for adapted, merged in zip(results["adapted"], results[name]):
            torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    assert not any("lora" in key or "base_layer" in key for key in results["merged_keys"])


def test_resumed_lora_run_gives_the_same_losses_and_adapter(lora_run, tiny_dataset_dir, tiny_model_dir, tmp_path):
    common = ["--base_model", str(tiny_model_dir), *LORA_FLAGS, "--checkpointing_steps", "2"]
    interrupted = run_train(tiny_dataset_dir, tmp_path / "b", "--max_train_steps", "2", *common)
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    resumed = run_train(
        tiny_dataset_dir, tmp_path / "b", "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *common
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in (tmp_path / "b" / "training.log").read_text()
    assert step_losses(tmp_path / "b")[3] == step_losses(lora_run)[3]
    assert validation_records(tmp_path / "b")[-1] == validation_records(lora_run)[-1]
    expected = load_file(lora_run / "model" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "b" / "model" / "adapter_model.safetensors")
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_prior_images_are_the_base_models_own_seed_samples_and_captions(tiny_model_dir):
    args = parse_args(
        ["--dataset_path", "data", "--output_dir", "out", "--base_model", str(tiny_model_dir), "--lora_rank", "4"]
        + ["--num_prior_images", "3"]
    )
    PartialState()  # train.py's logger is accelerate's
    pixels, captions = draw_prior_images(args, torch.device("cpu"))
    samples = EngravingPipeline.from_pretrained(tiny_model_dir)(seeds=[PRIOR_IMAGE_FIRST_SEED + i for i in range(3)])
    assert pixels.dtype.name == "uint8" and pixels.shape[0] == 3
    assert [Image.fromarray(p.transpose(1, 2, 0)).tobytes() for p in pixels] == [i.tobytes() for i in samples.images]
    assert captions == samples.captions


def test_lora_run_with_prior_images_trains_on_them_and_says_so(tiny_dataset_dir, tiny_model_dir, tmp_path):
    flags = ["--base_model", str(tiny_model_dir), "--max_train_steps", "2", "--num_prior_images", "8", *LORA_FLAGS]
    result = run_train(tiny_dataset_dir, tmp_path / "run", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "training.log").read_text()
    assert "Drew 8 prior images" in log and "on 32 images" in log  # the 24 training shapes and the 8 prior images
    assert "8 of the base model's own seed samples joined" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_two_processes_train_an_adapter_with_prior_images(tiny_dataset_dir, tiny_model_dir, tmp_path):
    flags = ["--base_model", str(tiny_model_dir), "--max_train_steps", "2", "--num_prior_images", "8", *LORA_FLAGS]
    result = run_train(
        tiny_dataset_dir,
        tmp_path / "run",
        *flags,
        "--train_batch_size",
        "4",
        launcher=two_cpu_processes(29518),
        environment={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "training.log").read_text()
    # Both processes drew the same prior images, so the 32 images split into 4 steps of 2 x 4.
    assert "on 32 images, 2 process(es) x batch 4" in log and "(4 per epoch)" in log
    adapted = EngravingPipeline.from_pretrained(tiny_model_dir, adapter_id=tmp_path / "run" / "model")(seeds=[3])
    assert len(adapted.captions) == 1


def test_prior_images_without_a_base_model_stop_with_one_sentence(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_path", "data", "--output_dir", "out", "--num_prior_images", "8"])
    assert "--num_prior_images draws from --base_model" in capsys.readouterr().err


def test_lora_flags_without_a_base_model_stop_with_one_sentence(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_path", "data", "--output_dir", "out", "--lora_rank", "4"])
    assert "--base_model and --lora_rank go together" in capsys.readouterr().err


def test_the_app_serves_the_adapted_model_with_model_id_and_adapter_id(lora_run, tiny_model_dir, monkeypatch):
    from gradio_client import Client
    from test_app import free_port

    import app

    monkeypatch.setenv("MODEL_ID", str(tiny_model_dir))
    monkeypatch.setenv("ADAPTER_ID", str(lora_run / "model"))
    demo = app.main(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        image_path, caption = Client(demo.local_url, verbose=False).predict(3, api_name="/generate")
    finally:
        demo.close()
    adapted = EngravingPipeline.from_pretrained(tiny_model_dir, adapter_id=lora_run / "model")(seeds=[3])
    base = EngravingPipeline.from_pretrained(tiny_model_dir)(seeds=[3])
    served = Image.open(image_path).convert("RGB")
    assert ImageChops.difference(served, adapted.images[0]).getbbox() is None and caption == adapted.captions[0]
    assert ImageChops.difference(served, base.images[0]).getbbox() is not None
