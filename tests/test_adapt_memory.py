"""Host memory of adapt(): the float kernels it replaces are freed (issue 9, inplace=True).

The in-process tests check with weak references that nothing keeps a replaced kernel
(or, after a copy, the original model) alive. They measure no memory and no time.
"""

import gc
import weakref

import hub_models
import tf_lora
from tf_lora.adapt import _select

QLORA = tf_lora.LoRAConfig(rank=2, target_modules="all-linear", quantization=tf_lora.QLoRAConfig())


def _kernel_refs(model, config):
    targets, _ = _select(model, config)
    return [weakref.ref(layer.kernel) for layer in targets.values()]


def test_inplace_frees_every_replaced_kernel():
    model = hub_models.gemma()
    refs = _kernel_refs(model, QLORA)
    assert tf_lora.adapt(model, QLORA, inplace=True, verbose=0) is model
    gc.collect()
    assert refs and [r for r in refs if r() is not None] == []


def test_a_copy_does_not_keep_the_original_alive():
    base = hub_models.gemma()
    refs = _kernel_refs(base, QLORA) + [weakref.ref(base), weakref.ref(base.backbone.token_embedding.embeddings)]
    model = tf_lora.adapt(base, QLORA, verbose=0)
    del base
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert isinstance(model.backbone.get_layer("decoder_block_0").attention.query_dense, tf_lora.QLoRAEinsumDense)
