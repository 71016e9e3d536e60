# Follows backend/attention.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/attention.py: ``attention_function(q, k, v, heads, mask=None)`` on (B, tokens, heads·dim)."""
import torch.nn.functional as F


def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)
