"""The training loop on real digits: greedy stages, corruption in training only, quality floors,
exact resume, early stopping and checkpoint errors."""

import dataclasses

import pytest
import torch

from aet.training.augmentation import AugmentationConfig
from aet.training.checkpoint import CheckpointError, load_checkpoint
from aet.training.data import load_dataset
from aet.training.evaluate import encode_array, evaluate_autoencoder, reconstruction_mse
from aet.training.models import ModelConfig, build_autoencoder
from aet.training.train import Trainer, TrainingConfig, TrainingInterrupted

torch.set_num_threads(1)

STACKED = ModelConfig(architecture="stacked", hidden_sizes=(32,), code_size=4, loss="bce")
QUICK = TrainingConfig(
    epochs=2,
    layer_epochs=1,
    batch_size=128,
    patience=5,
    noise="masking",
    noise_level=0.25,
    progress=False,
)
# Shifted, turned and resized batches from a DataLoader worker process: resumes exactly too.
AUGMENTED = dataclasses.replace(
    QUICK, augmentation=AugmentationConfig(0.1, 10.0, 0.1), loader_workers=1
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make_trainer(digits, run_dir, model_config=STACKED, config=QUICK, init_seed=0):
    torch.manual_seed(init_seed)
    model = build_autoencoder(model_config, digits.image_shape)
    return Trainer(model, digits, config, run_dir, run_config={"test": True})


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def changed_keys(before, after):
    return {key for key in before if not torch.equal(before[key], after[key])}


def test_greedy_stages_train_their_layer_and_leave_the_others_unchanged(digits, tmp_path):
    trainer = make_trainer(
        digits, tmp_path, ModelConfig(architecture="stacked", hidden_sizes=(32, 16), code_size=4)
    )
    assert [s.name for s in trainer.stages] == ["layer-1", "layer-2", "layer-3", "fine-tune"]
    for k in range(3):
        before = snapshot(trainer.model)
        trainer.run_stage()
        # Tied weights: layer k owns its encoder weight and bias and its decoder bias.
        assert changed_keys(before, snapshot(trainer.model)) == {
            f"encoder_layers.{k}.weight",
            f"encoder_layers.{k}.bias",
            f"decoder_layers.{k}.bias",
        }
    before = snapshot(trainer.model)
    trainer.run_stage()
    assert changed_keys(before, snapshot(trainer.model)) == set(before)  # fine-tune: everything
    assert trainer.finished
    assert all(len(trainer.history[name]["val_loss"]) >= 1 for name in trainer.history)


def test_corruption_is_drawn_in_training_only(digits, tmp_path):
    trainer = make_trainer(
        digits, tmp_path, ModelConfig(architecture="mlp", hidden_sizes=(32,), code_size=4)
    )
    noise_state = trainer.corruption.generator.get_state()
    trainer.fit()
    assert not torch.equal(noise_state, trainer.corruption.generator.get_state())

    noise_state = trainer.corruption.generator.get_state()
    model, x = trainer.model, digits.test.x
    codes = encode_array(model, x)
    assert (codes == encode_array(model, x)).all()
    assert reconstruction_mse(model, x) == reconstruction_mse(model, x)
    assert torch.equal(noise_state, trainer.corruption.generator.get_state())


def test_short_digits_run_beats_pca_reconstruction_and_passes_a_probe_floor(digits, tmp_path):
    config = TrainingConfig(epochs=30, learning_rate=3e-3, noise="none", progress=False)
    trainer = make_trainer(
        digits, tmp_path, ModelConfig(architecture="mlp", hidden_sizes=(128,), code_size=8), config
    )
    trainer.fit()
    result = evaluate_autoencoder(trainer.model, digits, label_counts=(100, None))
    mse = result["reconstruction_mse"]
    assert mse["pca"] == pytest.approx(0.0246, abs=5e-4)  # PCA-8 on the 30 % digits test split
    assert mse["model"] < 0.8 * mse["pca"]
    assert result["probe"]["labels"] == [100, 1257]
    accuracy, settings = result["probe"]["accuracy"], result["probe"]["settings"]
    assert accuracy["model"]["logreg"][1] >= 0.90
    # Raw pixels, C and standardisation chosen by CV on the labelled rows (measured 0.967).
    assert accuracy["pixels"]["logreg"][1] == pytest.approx(0.967, abs=0.005)
    assert accuracy["pixels"]["knn"][1] >= 0.97  # measured 0.983
    assert settings["pixels"]["logreg"][0]["settings"] == {"standardise": False, "C": 10.0}


@pytest.mark.parametrize("config", [QUICK, AUGMENTED], ids=["noise", "noise+augmentation"])
def test_resume_after_a_stop_request_mid_epoch_continues_exactly(digits, tmp_path, config):
    reference = make_trainer(digits, tmp_path / "reference", config=config)
    reference.fit()

    interrupted = make_trainer(digits, tmp_path / "run", config=config)
    interrupted.run_stage()  # layer-1, then stop one step into layer-2
    interrupted.request_stop()
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved.stage, saved.epoch, saved.training_state["step"]) == ("layer-2", 0, 1)

    # other init: all from disk
    resumed = make_trainer(digits, tmp_path / "run", config=config, init_seed=123)
    resumed.resume()
    resumed.fit()
    assert resumed.history == reference.history
    assert changed_keys(snapshot(reference.model), snapshot(resumed.model)) == set()


def test_early_stopping_ends_the_stage_and_restores_the_best_weights(digits, tmp_path):
    # A learning rate this large makes the validation loss stop improving within a few epochs.
    config = TrainingConfig(epochs=40, patience=2, learning_rate=0.5, noise="none", progress=False)
    trainer = make_trainer(
        digits, tmp_path, ModelConfig(architecture="mlp", hidden_sizes=(16,), code_size=4), config
    )
    history = trainer.fit()["train"]
    assert history["stopped_early"]
    assert len(history["val_loss"]) == history["best_epoch"] + 2 < 40
    best = load_checkpoint(tmp_path / "best.pt").build_model()
    assert changed_keys(snapshot(best), snapshot(trainer.model)) == set()
    assert min(history["val_loss"]) == history["val_loss"][history["best_epoch"] - 1]


def test_resuming_a_checkpoint_of_another_architecture_fails_cleanly(digits, tmp_path):
    make_trainer(digits, tmp_path).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    other = make_trainer(
        digits, tmp_path, ModelConfig(architecture="vae", hidden_sizes=(32,), code_size=4)
    )
    with pytest.raises(
        CheckpointError,
        match=r"holds a different model; expected .*'vae'.* "
        r"got .*'stacked'",
    ):
        other.resume()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_missing_corrupt_or_foreign_checkpoints_raise_checkpoint_error(digits, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        make_trainer(digits, tmp_path).resume()
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="expected format 'aet-checkpoint/1', got None"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_truncated_or_inconsistent_checkpoints_raise_checkpoint_error(digits, tmp_path):
    make_trainer(digits, tmp_path).fit()
    path = tmp_path / "best.pt"
    payload = torch.load(path, weights_only=True)
    torch.save(
        {**payload, "model_config": {**payload["model_config"], "hidden_sizes": [8]}},
        tmp_path / "edited.pt",
    )
    with pytest.raises(
        CheckpointError, match="edited.pt: weights do not fit its model configuration"
    ):
        load_checkpoint(tmp_path / "edited.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_best_checkpoint_holds_what_export_needs(digits, tmp_path):
    trainer = make_trainer(digits, tmp_path)
    trainer.fit()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.training_state is None
    assert (best.image_shape, best.raw_max, best.source) == ((1, 8, 8), 16.0, digits.source)
    assert best.model_config == STACKED and best.run_config == {"test": True}
    x = torch.from_numpy(digits.test.x[:5])
    torch.testing.assert_close(best.build_model().encode(x), trainer.model.eval().encode(x))


def test_augmentation_changes_the_training_loss_but_not_validation_data(digits, tmp_path):
    plain = make_trainer(digits, tmp_path / "plain")
    augmented = make_trainer(digits, tmp_path / "augmented", config=AUGMENTED)
    assert plain.run_stage() is None and augmented.run_stage() is None  # layer-1 reads pixels
    plain_loss = plain.history["layer-1"]["train_loss"][0]
    assert augmented.history["layer-1"]["train_loss"][0] != pytest.approx(plain_loss, rel=1e-3)
    saved = load_checkpoint(tmp_path / "augmented" / "checkpoint.pt").training_state
    assert saved["random_states"][0]["augmentation_generator"] is not None


@pytest.mark.parametrize("input_only", [False, True])
def test_input_only_augmentation_keeps_the_clean_image_as_the_target(digits, tmp_path, input_only):
    moves = AugmentationConfig(0.25, 0.0, 0.0, augment_input_only=input_only)
    config = dataclasses.replace(QUICK, noise="none", augmentation=moves)
    trainer = make_trainer(digits, tmp_path, config=config)
    stage = trainer.stages[0]
    rows = torch.from_numpy(digits.train.x[:64]).flatten(1)
    target, inputs = trainer._target_and_input(stage, rows)
    assert not torch.equal(inputs, rows)  # a shift of up to 2 pixels moved the batch
    assert torch.equal(target, rows if input_only else inputs)


def test_bf16_mixed_precision_trains_on_cpu(digits, tmp_path):
    config = dataclasses.replace(QUICK, precision="bf16", noise="none")
    trainer = make_trainer(
        digits, tmp_path, ModelConfig(architecture="mlp", hidden_sizes=(32,), code_size=4), config
    )
    before = snapshot(trainer.model)
    history = trainer.fit()["train"]
    assert all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert history["val_loss"][-1] < history["val_loss"][0] * 1.01
    assert changed_keys(before, snapshot(trainer.model)) == set(before)
