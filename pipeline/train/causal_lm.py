"""The Trainer of the causal-LM stages (PT, SFT): its loss never holds full-vocabulary logits.

The model runs with `logits_to_keep=1` (one position's logits, not the sequence's) and hands back
its final hidden states; `losses.causal_lm_loss_sum` sends only the supervised positions through the
output head, in chunks (or liger-kernel's fused linear cross-entropy on a CUDA GPU). The loss is the
mean over the supervised tokens of the whole global batch, gradient accumulation and data-parallel
ranks included, as transformers computes it with `num_items_in_batch`.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from pipeline.errors import UserError
from pipeline.model.adapters import unwrap
from pipeline.model.compiled import compile_decoder_layers
from pipeline.model.head import check_head, final_hidden, output_head
from pipeline.model.unpadding import keeps_rows_apart, packing_refused
from pipeline.train.losses import causal_lm_loss_sum
from pipeline.train.master_weights import MasterWeightsAdamW

logger = logging.getLogger(__name__)


def fused_loss_available(head: torch.nn.Module) -> bool:
    """liger-kernel's fused kernel reads the head's weight directly: a plain Linear on a CUDA
    device, not sharded by ZeRO-3 (wrapped heads, e.g. LoRA or modules_to_save copies, take the
    chunked path)."""
    return (
        type(head) is torch.nn.Linear
        and head.weight.is_cuda
        and not is_deepspeed_zero3_enabled()
        and importlib.util.find_spec("liger_kernel") is not None
    )


class CausalLMTrainer(Trainer):
    def __init__(self, *args, loss_chunk_size: int = 2048, blocks: bool = False, **kwargs):
        """`blocks`: PT's blocks of documents; a model that cannot keep a block's documents apart
        trains them as one sequence (the classic concatenation) instead of being refused."""
        super().__init__(*args, **kwargs)
        self.loss_chunk_size, self.blocks = loss_chunk_size, blocks
        self.sharded_head = is_deepspeed_zero3_enabled()
        if (
            self.sharded_head
            and torch.cuda.is_available()
            and importlib.util.find_spec("liger_kernel") is not None
        ):
            logger.info(
                "ZeRO-3 shards the output head: the loss runs in chunks, "
                "not liger-kernel's fused cross-entropy"
            )
        self.model_accepts_loss_kwargs = (
            True  # the loss below divides by the global token count itself
        )
        if getattr(self.args, "compile_layers", False):
            compile_decoder_layers(self.model)
        self.can_return_loss = True

    def _output_head(self, model):
        """The output head (with the model's logit transform) under any wrapper, found once per
        wrapper (accelerate's unwrap asks the package metadata whether DeepSpeed is installed at
        every call: ~2 ms a step), and checked against the model's own logits on its first use."""
        kept = getattr(self, "_head", None)
        if kept is None or kept[0] is not model:
            kept = self._head = (model, output_head(self.accelerator.unwrap_model(model)))
        return kept[1]

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x input tokens x weights outside the embeddings) with the
        weights counted once per model: transformers walks every module and weight to count them
        at each micro-step, a few ms of host time a step on a 1B model."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        kept = getattr(self, "_weights_counted", None)
        if kept is None or kept[0] is not self.model:
            kept = self._weights_counted = (
                self.model,
                self.model.num_parameters(exclude_embeddings=True),
            )
        return 6 * inputs[main].numel() * kept[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        head = self._output_head(model)
        check_head(model, inputs["input_ids"], head)
        if "position_ids" in inputs and "attention_mask" not in inputs:  # packed rows
            if not self._rows_apart(model, inputs):
                inputs.pop("position_ids")  # PT: one sequence a block (refused otherwise)
        hidden, outputs = final_hidden(model, **inputs)
        mixed = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        loss_sum, count = causal_lm_loss_sum(
            hidden,
            labels,
            head,
            self.loss_chunk_size,
            fused=fused_loss_available(head),
            compute_dtype=mixed,
            sharded_head=self.sharded_head,
        )
        if num_items_in_batch is None:  # evaluation: the mean over this batch's supervised tokens
            loss = loss_sum / count.clamp(min=1)
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = (
                    loss * self.accelerator.num_processes
                )  # DDP averages the gradients of the ranks
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None and num_items_in_batch is not None:
            # a mixture of experts' router balance loss, weighted as the model's own forward weighs
            # it, once per optimizer step (each micro-step's share; the ranks' gradients are
            # averaged); evaluation reports the language-model loss alone (its perplexity)
            config = self.accelerator.unwrap_model(model).config
            coef = getattr(config, "router_aux_loss_coef", None)
            coef = getattr(config, "aux_loss_coef", 0.0) if coef is None else coef  # JetMoE's name
            steps = getattr(  # an epoch's last step may hold fewer micro-steps
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            loss = loss + coef * aux.to(loss.device) / steps
        return (loss, outputs) if return_outputs else loss

    def _rows_apart(self, model, inputs) -> bool:
        base = unwrap(self.accelerator.unwrap_model(model))

        bounded = "cu_seq_lens_q" in inputs  # the rows' bounds go along as in the step's own

        def forward(ids, positions, bounds):
            extra = bounds if bounded else {}
            return model(input_ids=ids, position_ids=positions, use_cache=False, **extra).logits

        if keeps_rows_apart(base, forward, half=self.args.bf16 or self.args.fp16):
            return True
        if not self.blocks:
            raise UserError(packing_refused(base))
        if not getattr(self, "_said_blocks", False):
            self._said_blocks = True
            logger.warning(
                "%s does not keep the documents of a block apart (its attention does not read "
                "the position ids that restart at each document, e.g. under prefix tuning): each "
                "block trains as one sequence, a document attending to the ones before it",
                type(base).__name__,
            )
        return False

    def create_optimizer(self, model=None):
        """--master_weights optimizer: the Trainer's AdamW with float32 masters of the weights (made
        from the weights as loaded), then the model's weights cast to bf16
        (pipeline/train/master_weights.py)."""
        optimizer = super().create_optimizer(model)
        if getattr(self.args, "master_weights", "model") != "optimizer" or isinstance(
            optimizer, MasterWeightsAdamW
        ):
            return optimizer
        self.optimizer = MasterWeightsAdamW.replacing(optimizer)
        for weight in (p for g in self.optimizer.param_groups for p in g["params"]):
            weight.data = weight.data.to(torch.bfloat16)
        logger.info(
            "--master_weights optimizer: bf16 weights in the model, "
            "float32 masters in the optimizer"
        )
        return self.optimizer

    @contextmanager
    def _masters_in_model(self):
        """The float32 masters stand in the model's weights while it is saved (the saved model is
        the trained one, not its bf16 rounding)."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if not isinstance(optimizer, MasterWeightsAdamW):
            yield
            return
        pairs = [
            (w, m)
            for g, inner in zip(optimizer.param_groups, optimizer.inner.param_groups)
            for w, m in zip(g["params"], inner["params"])
        ]
        half = [w.data for w, _ in pairs]
        for weight, master in pairs:
            weight.data = master.data
        try:
            yield
        finally:
            for (weight, _), data in zip(pairs, half):
                weight.data = data

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A checkpoint saved under --master_weights optimizer holds its moments beside float32
        masters; a plain AdamW would load it as empty state (Adam restarted from scratch): refused
        in one sentence."""
        saved = Path(checkpoint, "optimizer.pt") if checkpoint else None
        if (
            saved is not None
            and saved.is_file()
            and getattr(self.args, "master_weights", "model") != "optimizer"
        ):
            try:  # read lazily (mmap); a state of other types than tensors and numbers is not
                # ours to judge
                keys = torch.load(saved, map_location="cpu", mmap=True, weights_only=True).keys()
            except Exception:  # noqa: BLE001
                keys = ()
            if "masters" in keys:
                raise UserError(
                    f"{checkpoint} was saved under --master_weights optimizer "
                    "(its optimizer state keeps "
                    "float32 masters); resume it with that flag."
                )
        super()._load_optimizer_and_scheduler(checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        with self._masters_in_model():
            super()._save(output_dir, state_dict)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation needs the loss only; returning no logits keeps them from being gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
