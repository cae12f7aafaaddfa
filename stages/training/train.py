"""train.ram.v1: train a RAM / RAM++ tagger on the export Parquet (the base model of later stages)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import ReduceResult, Resources, RowSource, Stage, StageConfig
from stages.training.holdout import Fitted, Split, calibrate, held_out, split_rows, truth_map


class TrainStageConfig(StageConfig):
    model: str = Field("ram_test", description="registered entrypoint (ram_swin_l_384, ram_plus_swin_l_384, "
                       "ram_test, cnn_tagger_tiny, ...)")
    model_args: dict = Field(default_factory=dict, description="entrypoint overrides, e.g. {image_size: 128}")
    init_checkpoint: str | None = Field(None, description="local checkpoint to start from (official layout); a "
                                        "RAM / RAM++ one keeps its label space (model/finetune.py)")
    init_tag_list: str | None = Field(None, description="the init_checkpoint's tag names, one a line (official "
                                      "ram_tag_list.txt): tags it knows keep their rows, matched by name or synonym")
    new_tag_rows: Literal["encoder", "project"] = Field(
        "encoder", description="fine-tuning, rows for tags the checkpoint does not know: 'encoder' takes the text "
        "encoder's (it must be the checkpoint's width: CLIP ViT-B/16, 512-d); 'project' maps another encoder's "
        "(MiniLM, 384-d) by a ridge fit on the known tags and reports its held-out cosine")
    descriptions: str | None = Field(None, description="RAM++: tag descriptions JSON in the official format "
                                     "[{tag: [51 strings]}]; tags without one get 51 template rows")
    align_weight: float = Field(0.0, ge=0, description="RAM++: weight of the image-text alignment loss (the "
                                "official recipe: 1), each image's caption embedded by the text encoder")
    text_encoder: Literal["minilm", "clip", "none"] = Field("minilm", description="label queries from tag names")
    text_weights: str | None = Field(None, description="local weights for the text encoder (clip needs them)")
    freeze_label_embed: bool = True
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="the cosine decay's floor, a share of lr")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share, chosen by hash of image_id")
    seed: int | None = Field(None, description="default: the run seed")
    device: str = Field("cpu", description="cpu or cuda")
    loss: Literal["asl", "bce"] = Field("asl", description="asl: RAM's asymmetric loss; bce: plain")
    hflip: bool = Field(False, description="flip half of each batch left-right")
    caption_weight: float = Field(1.0, ge=0, description="weight of RAM's image-tag-text generation loss when "
                                  "the model has the caption branch (model_args: {caption_branch: true})")
    channels_last: bool = Field(False, description="train with channels-last weights and batches (convolutional "
                                "models: faster on CPU, bench/cnn_train.py; numerically a different run)")
    cache_images: bool = Field(False, description="opt-in for tiny corpora: keep decoded, resized images in "
                               "memory after the first epoch (a 64 px image is 48 KiB as a tensor; with "
                               "resources.loader_workers > 0 each loader process keeps its own copy). Off: every "
                               "epoch decodes")
    bf16: bool = Field(True, description="bf16 autocast on CUDA")
    cpu_bf16: bool = Field(False, description="bf16 autocast on a CPU too: faster where the CPU has bf16 units "
                           "(AMX, AVX512-BF16; bench/cnn_train.py), slower where it has none; numerically "
                           "another run")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm before each step")
    global_batch_size: int | None = Field(None, ge=1, description="images per optimizer step over all workers, "
                                          "reached by gradient accumulation (a multiple of batch_size x workers)")
    eval_max_images: int = Field(10_000, ge=1, description="held-out images scored for mAP and threshold "
                                 "calibration: a fixed sample by hash of image_id; at 4,585 tags, 10,000 images "
                                 "hold ~370 MB of scores and labels on one process")
    teacher: Literal["none", "ram", "clip"] = Field("none", description="L1 distillation of the pooled image "
                                                    "embedding: a released RAM checkpoint, or CLIP (open_clip)")
    teacher_weights: str | None = Field(None, description="local weights of the teacher")
    teacher_model: str = Field("ram_swin_l_384", description="teacher entrypoint (teacher: ram)")
    teacher_model_args: dict = Field(default_factory=dict, description="teacher entrypoint overrides")
    distill_weight: float = Field(1.0, ge=0, description="weight of the distillation term")
    backend: Literal["local", "ray_train"] = Field("local", description="local: the loop in this process; "
                                                   "ray_train: a Ray Train job (DDP, each worker its own rows)")
    workers: int = Field(1, ge=1, description="ray_train: training workers (device cuda: one GPU each). What "
                         "is trained, not only how: each worker takes batch_size images a step from its own share "
                         "of every epoch, so the global batch, the step count and the weights depend on it")
    calibrate_precision: float = Field(0.9, gt=0, le=1, description="per-class thresholds: the lowest score "
                                       "whose held-out precision (vs the labels) reaches this; 1.0 if none does")
    calibrate_min_hits: int = Field(3, ge=1, description="a threshold needs this many held-out true hits above it")

    @model_validator(mode="after")
    def _teacher_has_weights(self):
        if self.teacher != "none" and not self.teacher_weights:
            raise ValueError(f"teacher {self.teacher!r} needs teacher_weights: a local path (nothing is downloaded)")
        return self


class TrainResources(Resources):
    """How a train step runs, not what it trains, so a change re-runs nothing: a job resumes from any
    checkpoint bit for bit, loader processes decode the very batches the loop would, and a restart limit
    only decides whether a failure ends the job (tests/test_train.py, tests/test_train_ray.py). The CPUs a
    worker gets set its thread count, which can move the last bits of float sums, as another machine's
    cores do. What the job computes, ``workers`` included, is the stage's config."""

    moved_from_config: ClassVar[dict[str, str]] = {
        "cpus_per_worker": "cpus_per_worker", "max_failures": "max_failures",
        "checkpoint_every_steps": "checkpoint_every_steps", "num_workers": "loader_workers",
        "prefetch_factor": "prefetch_factor"}
    cpus_per_worker: float = Field(1.0, gt=0, description="ray_train: CPUs each training worker reserves (its "
                                   "loader processes too)")
    max_failures: int = Field(2, ge=0, description="ray_train: worker-group restarts from the latest checkpoint")
    checkpoint_every_steps: int = Field(0, ge=0, description="ray_train: a checkpoint every N optimizer steps "
                                        "besides each epoch's end (0: epoch ends only)")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes decoding ahead of the model in each "
                                "training worker and in evaluation (0: in process)")
    prefetch_factor: int = Field(2, ge=1, description="batches each loader process decodes ahead")


@register("train.ram.v1")
class TrainStage(Stage):
    """Held-out mAP before and after training is recorded; checkpoints resume after a crash."""

    kind = "reduce"
    Config = TrainStageConfig
    Resources = TrainResources
    resources = TrainResources()
    inputs = ("image_id", "union_label_id")
    optional_inputs = ("image_path", "image", "image_bytes", "caption", "captions", "parse_label_id")
    needs = ("tagset",)
    provides = ("tagger",)

    def _truth_map(self, model, val_set, tagset) -> dict:
        """On a scene world, the held-out mAP against the truth (parse labels are noisy by design)."""
        from model.data import make_loader
        from model.metrics import predict_all
        from model.train import model_device
        from pipeline.store import StepDir
        from stages.world.score import names_for_ids, truth_by_image

        truth = truth_by_image(StepDir(self.context.artifact("truth")).read(name="truth"))
        r = self.resources
        scores, _, index = predict_all(model, make_loader(val_set, 64, model_device(model), r.loader_workers,
                                                          r.prefetch_factor))
        ids = [val_set.image_id(int(i)) for i in index]
        m, chance = truth_map(scores, ids, truth, names_for_ids(tagset))
        return {"val_truth_mAP_after": round(m, 4), "val_truth_chance_mAP": round(chance, 4)}

    def _calibrate(self, model, val_set, n: int) -> list[float]:
        from model.data import make_loader
        from model.metrics import predict_arrays
        from model.train import model_device

        r = self.resources
        scores, labels = predict_arrays(model, make_loader(val_set, 64, model_device(model), r.loader_workers,
                                                           r.prefetch_factor))
        return calibrate(scores, labels, self.config.calibrate_precision, self.config.calibrate_min_hits)

    def _device(self, c: TrainStageConfig | None = None) -> str:
        """Where this process computes: ``device``, except that a Ray Train driver only orchestrates (its
        workers get the GPUs), so it scores the held-out sample on a GPU only when it has one."""
        import torch

        c = c or self.config
        if c.backend == "ray_train":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return c.device

    def planned(self) -> TrainStageConfig:
        """The config this step will train with (a retrain: its base's recipe under its own keys)."""
        return self.config

    def drives_ray(self) -> bool:
        return self.planned().backend == "ray_train"

    def input_fingerprint(self) -> str:
        """Where the step computes and in what precision, as resolved on this machine: the training runs
        in bf16 on a GPU (``bf16``) or where a CPU is asked to (``cpu_bf16``), and a Ray Train driver embeds
        label names and scores the held-out sample (calibration) on a GPU, in bf16, only when it has one;
        the same config on a CPU is another result."""
        c = self.planned()
        driver = self._device(c)
        bf16 = c.bf16 if c.device == "cuda" else c.cpu_bf16
        return json.dumps({"train": [c.device, "bf16" if bf16 else "fp32"],
                           "driver": [driver, "bf16" if driver == "cuda" else "fp32"]}, sort_keys=True)

    def _build_model(self, tagset):
        """The model for ``tagset``: from scratch, or from a released checkpoint in its own label space.
        Returns it, the entrypoint arguments that rebuild it, statistics of the label transfer, and the
        caption encoder of RAM++'s alignment loss (in the model's label space) when ``align_weight`` asks."""
        from model.finetune import ProjectedEncoder, transfer_labels
        from model.checkpoint import load_checkpoint, load_state
        from model.registry import create_model
        from model.text import description_rows, description_texts, label_embeddings, load_descriptions, \
            make_encoder

        c = self.config
        args = {"num_classes": len(tagset), **c.model_args}
        model = create_model(c.model, **args)
        ram = hasattr(model, "set_vocabulary")  # label queries from tag names: RAM (a CNN has one output per tag)
        encoder = make_encoder(c.text_encoder, c.text_weights, self._device()) \
            if c.text_encoder != "none" and ram else None
        descriptions = load_descriptions(c.descriptions) if c.descriptions else None
        per = model.cfg.descriptions_per_class if ram and model.cfg.variant == "ram_plus" else 1
        stats: dict = {}
        if c.init_checkpoint and ram:
            state = load_state(c.init_checkpoint)
            emb = (state["model"] if isinstance(state.get("model"), dict) else state)["label_embed"]
            if not c.init_tag_list:
                raise ValueError("train.init_tag_list: fine-tuning a RAM checkpoint needs its tag names, one a line "
                                 "(the official ram_tag_list.txt), to map the tagset onto its label rows")
            names = Path(c.init_tag_list).read_text(encoding="utf-8").splitlines()
            args.update(num_classes=emb.shape[0] // per, label_dim=emb.shape[1])
            model = load_checkpoint(create_model(c.model, **args), state)
            tr = transfer_labels(emb, names, [(t.name, t.synonyms) for t in tagset.tags], per,
                                 (lambda n: description_texts(n, descriptions, per)) if per > 1 else None,
                                 encoder, c.new_tag_rows, f"text encoder {c.text_encoder!r}")
            model.set_vocabulary(tr.label_embed, tagset.thresholds(), trainable=not c.freeze_label_embed)
            args["num_classes"] = len(tagset)
            stats = {f"init_{k}": v for k, v in tr.stats.items()}
            if tr.projection is not None:
                encoder = ProjectedEncoder(encoder, tr.projection)
        else:
            if encoder is not None:
                args["label_dim"] = encoder.dim
                model = create_model(c.model, **args)
            if c.init_checkpoint:  # a tagger without label rows (model/cnn.py): a strict load of the same shapes
                model.load_state_dict(load_state(c.init_checkpoint)["model"])
            if encoder is not None:
                emb = description_rows(encoder, tagset.names, descriptions, per) if per > 1 \
                    else label_embeddings(encoder, tagset.names)
                model.set_vocabulary(emb, tagset.thresholds(), trainable=not c.freeze_label_embed)
        model.set_thresholds(tagset.thresholds())
        captions = None
        if c.align_weight > 0 and per == 1:
            raise ValueError(f"train.align_weight: the image-text alignment loss is RAM++'s; {c.model!r} is not")
        if c.align_weight > 0:
            if encoder is None or encoder.dim != model.cfg.label_dim:
                raise ValueError(f"train.align_weight: RAM++'s alignment compares caption embeddings with the "
                                 f"{model.cfg.label_dim}-d image embedding; text encoder {c.text_encoder!r} "
                                 f"{'is not set' if encoder is None else f'is {encoder.dim}-d'}")
            captions = encoder
        return model, args, stats, captions

    def _train_ray(self, model, args, source, val_ids, tc, out: Path, tagset, caption_encoder) -> tuple[dict, list]:
        """Train as a Ray Train job (``pipeline/trainer.py``, ``model/distributed.py``); the trained weights
        are loaded back into ``model``. A job re-run with the same config resumes from its latest checkpoint.
        Returns rank 0's result and the rejects the workers found (their images did not decode)."""
        import dataclasses
        import functools

        import torch

        from model.distributed import JobSpec, read_rejects, train_loop_per_worker
        from model.checkpoint import load_state
        from pipeline.config import RayConfig
        from pipeline.trainer import TrainJob, run_torch_job

        c, r = self.config, self.resources
        storage = out / "ray_train"
        storage.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict()}, storage / "init.pth")
        teacher = {"kind": c.teacher, "weights": c.teacher_weights, "model_name": c.teacher_model,
                   "model_args": c.teacher_model_args} if c.teacher != "none" else None
        captions = {"kind": c.text_encoder, "weights": c.text_weights,
                    "projection": getattr(caption_encoder, "projection", None)} if caption_encoder else None
        name = "run-" + hashlib.sha1(f"{c.model_dump_json()}:{tc.seed}".encode()).hexdigest()[:12]
        rejects_dir = storage / "rejects" / name
        spec = JobSpec(c.model, args, str(storage / "init.pth"), not c.freeze_label_embed, source, len(tagset),
                       dataclasses.asdict(tc), functools.partial(held_out, fraction=c.val_fraction),
                       frozenset(), val_ids, list(tagset.names), r.checkpoint_every_steps,
                       c.cache_images, teacher, captions, rejects_dir=str(rejects_dir))
        result = run_torch_job(train_loop_per_worker, {"spec": spec},
                               TrainJob(c.workers, c.device == "cuda", r.cpus_per_worker, str(storage), name,
                                        r.max_failures),
                               RayConfig.model_validate(self.context.ray), self.context.run_dir)
        with result.checkpoint.as_directory() as d:
            state = load_state(Path(d) / "model.pth")["model"]
        model.load_state_dict(state)
        return result.return_value, read_rejects(rejects_dir)

    def _train_config(self, seed: int):
        from model.train import TrainConfig

        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                           warmup_steps=c.warmup_steps, min_lr_ratio=c.min_lr_ratio, seed=seed, loss=c.loss,
                           hflip=c.hflip, caption_weight=c.caption_weight, distill_weight=c.distill_weight,
                           channels_last=c.channels_last, num_workers=self.resources.loader_workers,
                           prefetch_factor=self.resources.prefetch_factor, bf16=c.bf16, cpu_bf16=c.cpu_bf16,
                           grad_clip=c.grad_clip,
                           global_batch_size=c.global_batch_size, align_weight=c.align_weight)

    def run(self, rows: RowSource) -> ReduceResult:
        return self.fit(rows).result

    def fit(self, rows: RowSource) -> "Fitted":
        """Train on the rows' ``union_label_id`` and calibrate; the step's result plus what a later
        comparison needs (the model, the evaluation sample, the thresholds).

        The driver holds the evaluation sample (``eval_max_images`` rows) and counts, never a set or a
        list of all rows; with ``ray_train`` the workers read their own rows (``model/distributed.py``).

        Counting: every input row is trained on, held out, or rejected (its image did not decode, when
        training or evaluation came to it): ``rows_in = train_images + held_out_images + rejected_images``.
        Held-out rows outside the evaluation sample are never decoded, so they count as held out."""
        import torch

        from model.loop import train
        from model.data import ExportDataset
        from tagset.tagset import TagSet

        c = self.config
        seed = c.seed if c.seed is not None else self.context.seed
        torch.manual_seed(seed)
        tagset = TagSet.load(self.context.artifact("tagset"))
        model, args, label_stats, caption_encoder = self._build_model(tagset)
        ray_train = c.backend == "ray_train"
        model.to(self._device())
        source = rows if rows.view is not None else rows.files
        split = split_rows(source, c.val_fraction, c.eval_max_images)  # the rest of the held-out split is unused
        val_set = ExportDataset(source, len(tagset), model.cfg, split.eval_ids, cache=c.cache_images)
        out = Path(self.context.run_dir) / self.context.step
        tc = self._train_config(seed)
        teacher = None
        if c.teacher != "none":
            from model.teacher import make_teacher

            if not hasattr(model, "image_embeds") or not hasattr(model, "label_queries"):
                raise ValueError(f"train.teacher: distillation needs a RAM student; {c.model!r} has no pooled "
                                 f"image embedding to distil into")
            if not ray_train:  # Ray Train workers build their own
                teacher = make_teacher(c.teacher, c.teacher_weights, model.cfg, c.teacher_model,
                                       c.teacher_model_args, c.device)
        has_truth = "truth" in self.context.artifacts
        truth_before = self._truth_map(model, val_set, tagset) if has_truth and len(val_set) else {}
        if ray_train:
            res, found = self._train_ray(model, args, source, sorted(split.eval_ids), tc, out, tagset,
                                         caption_encoder)
        else:
            train_set = ExportDataset(source, len(tagset), model.cfg, cache=c.cache_images,
                                      keep=lambda i: not held_out(i, c.val_fraction), unknown=True)
            res = train(model, train_set, val_set, tc, out / "checkpoints", tag_names=list(tagset.names),
                        teacher=teacher, caption_encoder=caption_encoder,
                        log=lambda m: print(f"  [{self.context.step}] {m}", flush=True))
            found = list(train_set.rejects.values())
        truth_q = self._truth_map(model, val_set, tagset) if truth_before else {}
        if truth_q:
            truth_q["val_truth_mAP_before"] = truth_before["val_truth_mAP_after"]
        spec = {"entrypoint": c.model, "model_args": {k: v for k, v in args.items()}, "checkpoint": "model.pth",
                "variant": model.cfg.variant, "label_dim": model.cfg.label_dim, "num_classes": len(tagset)}
        torch.save({"model": model.state_dict()}, out / "model.pth")
        thresholds = self._calibrate(model, val_set, len(tagset)) if len(val_set) else tagset.thresholds()
        merged = {r.image_id: r for r in found}
        merged.update(val_set.rejects)  # evaluation images that did not decode (here or on rank 0: the same)
        rejects = [merged[k] for k in sorted(merged)]
        stats = self._stats(res, split, len(val_set), rejects, c.val_fraction)
        stats.update(truth_q)
        stats.update(label_stats)
        if ray_train:
            stats["ray_train_workers"] = c.workers
        if truth_q:
            stats["summary"] += (f"; vs truth: val mAP {truth_q['val_truth_mAP_before']:.3f} -> "
                                 f"{truth_q['val_truth_mAP_after']:.3f} "
                                 f"(chance {truth_q['val_truth_chance_mAP']:.3f})")
        stats["classes_calibrated"] = sum(1 for t in thresholds if t < 1.0)
        stats["summary"] += f"; {stats['classes_calibrated']} of {len(tagset)} tags reach precision " \
                            f"{c.calibrate_precision} on held-out images (the others never pseudo-label)"
        hist = res["history"]
        result = ReduceResult(rejects=rejects, files={"model.json": (json.dumps(spec, indent=1) + "\n").encode(),
                                     "thresholds.json": (json.dumps(thresholds) + "\n").encode(),
                                     "tag_list.txt": "\n".join(tagset.names).encode(),
                                     # the recipe that trained this tagger: a retrain step repeats it
                                     "recipe.json": (self.config.model_dump_json(indent=1) + "\n").encode(),
                                     "history.json": (json.dumps(hist, indent=1) + "\n").encode()}, stats=stats)
        return Fitted(model, tagset, val_set, thresholds, result)

    @staticmethod
    def _stats(res: dict, split: Split, eval_rows: int, rejects: list[Reject], fraction: float) -> dict:
        """``rows_in = train_images + held_out_images + rejected_images``; ``val_images``: the evaluation
        sample's images that decoded (a part of held_out_images)."""
        hist = res["history"]
        held_rejected = sum(1 for r in rejects if held_out(r.image_id, fraction))
        train_rejected = len(rejects) - held_rejected
        by_code: dict[str, int] = {}
        for r in rejects:
            by_code[r.code] = by_code.get(r.code, 0) + 1
        stats = {"rows_in": split.rows, "train_images": split.rows - split.held_out - train_rejected,
                 "held_out_images": split.held_out - held_rejected, "val_images": eval_rows - held_rejected,
                 "rejected_images": len(rejects), "rejected_by_code": dict(sorted(by_code.items())),
                 "train_labels": split.train_labels, "train_labels_sha1": split.train_labels_sha1,
                 "steps": res["steps"], "resumed_at": res.get("resumed_at"),
                 "loss_first_epoch": hist[1]["loss"], "loss_last_epoch": hist[-1]["loss"],
                 "val_mAP_before": round(hist[0]["mAP"], 4), "val_mAP_after": round(hist[-1]["mAP"], 4),
                 "val_chance_mAP": round(hist[-1]["chance_mAP"], 4),
                 "summary": f"val mAP {hist[0]['mAP']:.3f} -> {hist[-1]['mAP']:.3f} (chance "
                            f"{hist[-1]['chance_mAP']:.3f}), loss {hist[1]['loss']:.2f} -> {hist[-1]['loss']:.2f}"}
        if rejects:
            stats["summary"] += f"; {len(rejects)} rows rejected ({', '.join(f'{k} {v}' for k, v in by_code.items())})"
        return stats
