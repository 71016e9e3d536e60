# Follows backend/nn/unet.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/nn/unet.py: Forge's IntegratedUNet2DConditionModel forward in the parts patches see.

The tiny ldm U-Net's modules walked the Forge way: ``transformer_options["block"]`` is
("input"|"middle"|"output", index), each transformer block gets ``block_index``, attn1 goes through
``patches_replace["attn1"]`` (3-tuple key first, then the 2-tuple block key) with projected q/k/v
and ``to_out`` applied after, and ``patches["output_block_patch"]`` sees (h, hsp) before the
concatenation. ``extra_options`` = transformer_options minus patches, plus n_heads/dim_head."""
import torch

from lib_merge.testing.unet import ResBlock, SpatialTransformer, UNetModel, timestep_embedding


class IntegratedUNet2DConditionModel(UNetModel):
    def __init__(self, config):
        super().__init__(config)
        self.config_dict = {"model_channels": config.model_channels}

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        patches = transformer_options.get("patches", {})
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.config.adm_in_channels is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        hs, h = [], x
        for i, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            h = self._seq(module, h, emb, context, transformer_options)
            hs.append(h)
        transformer_options["block"] = ("middle", 0)
        h = self._seq(self.middle_block, h, emb, context, transformer_options)
        for i, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", i)
            hsp = hs.pop()
            for p in patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, transformer_options)
            h = torch.cat([h, hsp], dim=1)
            h = self._seq(module, h, emb, context, transformer_options)
        return self.out(h)

    def _seq(self, module, h, emb, context, to):
        for layer in module:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = self._spatial(layer, h, context, to)
            else:
                h = layer(h)
        return h

    def _spatial(self, st, x, context, to):
        b, _, hh, ww = x.shape
        x_in = x
        x = st.norm(x)
        if not st.use_linear:
            x = st.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if st.use_linear:
            x = st.proj_in(x)
        for i, block in enumerate(st.transformer_blocks):
            to["block_index"] = i
            x = self._block(block, x, context, to)
        if st.use_linear:
            x = st.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, hh, ww)
        if not st.use_linear:
            x = st.proj_out(x)
        return x + x_in

    def _block(self, blk, x, context, to):
        extra_options = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        heads = blk.attn1.heads
        extra_options["n_heads"] = heads
        extra_options["dim_head"] = blk.attn1.to_q.out_features // heads
        replace = to.get("patches_replace", {}).get("attn1", {})
        block = to.get("block")
        key = (block[0], block[1], to.get("block_index", 0)) if block is not None else None
        if key not in replace:
            key = block
        n = blk.norm1(x)
        if key in replace:
            q, k, v = blk.attn1.to_q(n), blk.attn1.to_k(n), blk.attn1.to_v(n)
            n = blk.attn1.to_out(replace[key](q, k, v, extra_options))
        else:
            n = blk.attn1(n)
        x = n + x
        x = blk.attn2(blk.norm2(x), context=context) + x
        return blk.ff(blk.norm3(x)) + x
