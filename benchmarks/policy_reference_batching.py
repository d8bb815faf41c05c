"""Training step with the KL reference: policy and reference in two transformer calls (what
``train_epoch`` does: a policy call, then a no-grad call under peft's ``disable_adapter()``) vs
ONE call on the stacked batch with peft's mixed-adapter batches (``adapter_names=``, the
policy rows with adapter "default", the reference rows with "__base__").

peft refuses ``adapter_names`` in training mode, so the one-call variant runs the peft model
in ``eval()`` mode (LoRA dropout is 0 here, so eval and train compute the same) with gradients
on; the reference rows then keep activations for backward although no loss depends on them.
The script first checks that both variants give the same policy and reference velocities,
then times forward + backward of each, interleaved.

    python benchmarks/policy_reference_batching.py [--size tiny|medium|large] [--full]
"""

from __future__ import annotations

import common
import torch

from identity_grpo.models import add_lora
from identity_grpo.pipelines.vace import VaceRolloutPipeline


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(common.SIZES), default="")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    common.setup(args)
    repeats = args.repeats or (9 if args.full else 5)
    sizes = [args.size] if args.size else (["tiny", "medium", "large"] if args.full else ["tiny", "medium"])
    config = common.preset("tiny")
    rows = []
    for name in sizes:
        size = common.SIZES[name]
        pipe = common.build_stock_pipeline(size)
        rollout_pipeline = VaceRolloutPipeline(pipe)
        refs = [common.reference_images(1) for _ in range(args.batch)]
        prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(args.batch)]
        rollouts, _ = rollout_pipeline(prompts, refs, height=size.height, width=size.width, num_frames=size.frames,
                                       num_inference_steps=2, guidance_scale=4.5, max_sequence_length=16,
                                       generator=torch.Generator().manual_seed(0))
        model = add_lora(pipe.transformer, config)
        with torch.no_grad():  # a non-zero LoRA, so policy and reference differ
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.05)
        batch = args.batch
        # The stacked-CFG inputs of one recorded step, as predict_noise builds them.
        hidden = torch.cat([rollouts.latents[:, 0]] * 2)
        timestep = rollouts.timesteps[0].expand(2 * batch)
        text = torch.cat([rollouts.prompt_embeds, rollouts.negative_prompt_embeds.expand(batch, -1, -1)])
        control = torch.cat([rollouts.conditioning] * 2)
        scale = torch.ones(len(pipe.transformer.config.vace_layers))

        def call(module, hidden, timestep, text, control, **extra):
            return module(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text,
                          control_hidden_states=control, control_hidden_states_scale=scale, return_dict=False,
                          **extra)[0].float()

        def two_calls():
            model.train()
            policy = call(model, hidden, timestep, text, control)
            with torch.no_grad(), model.disable_adapter():
                reference = call(model, hidden, timestep, text, control)
            (policy.pow(2).mean() + (policy - reference).pow(2).mean()).backward()
            model.zero_grad(set_to_none=True)
            return policy.detach(), reference

        def one_call():
            model.eval()
            both = call(model, torch.cat([hidden, hidden]), torch.cat([timestep, timestep]), torch.cat([text, text]),
                        torch.cat([control, control]), adapter_names=["default"] * (2 * batch) + ["__base__"] * (2 * batch))
            policy, reference = both.chunk(2)
            reference = reference.detach()
            (policy.pow(2).mean() + (policy - reference).pow(2).mean()).backward()
            model.zero_grad(set_to_none=True)
            return policy.detach(), reference

        try:
            policy_a, reference_a = two_calls()
            policy_b, reference_b = one_call()
            error = max((policy_a - policy_b).abs().max().item(), (reference_a - reference_b).abs().max().item())
            supported = "yes"
        except (TypeError, ValueError) as failure:
            print(f"  {name}: one batched call not possible: {failure}")
            rows.append([name, args.batch, "no", "", "", "", ""])
            continue
        times = common.interleaved({"two calls": two_calls, "one call": one_call}, repeats)
        rows.append([name, args.batch, supported, f"{error:.1e}", f"{common.median(times['two calls']) * 1e3:.1f}",
                     f"{common.median(times['one call']) * 1e3:.1f}",
                     f"{common.paired_ratio(times['one call'], times['two calls']):.3f}"])
        print(f"  {name}: two calls {common.spread(times['two calls'])}, one call {common.spread(times['one call'])}",
              flush=True)
    print(f"\nforward (policy with grad + reference) + backward of one trained step, CFG stacked (2B rows per "
          f"model), {repeats} interleaved repeats, medians; ratio < 1: one call is faster")
    print(common.table(["size", "batch", "adapter_names works", "max |diff| vs two calls", "two calls ms",
                        "one call ms", "ratio one/two"], rows))


if __name__ == "__main__":
    main()
