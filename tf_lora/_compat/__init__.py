"""Every use of a private Keras API, in one package, one function per need.

Keras offers no public way to do these few things (list a layer's own
variables or sublayers, edit tracked state after `build`, analyse an
EinsumDense equation, find a model's nested input structure). Each function
below wraps one of them, so that a Keras upgrade is a change to this package
only.

The functions live in four modules by topic (`layers`, `objects`, `training`, `runtime`);
the rest of tf_lora imports this package and calls ``_compat.<name>``, never a submodule.
"""


from tf_lora._compat.layers import (  # noqa: F401
    Functional,
    KerasSaveable,
    _keras_analyze_einsum,
    adopt_variable,
    analyze_einsum,
    built_input_shapes,
    child_layers,
    created_trainable,
    functional_signature,
    get_keras_mask,
    model_io,
    own_variables,
    set_keras_mask,
    unlocked,
    untrack_variable,
)
from tf_lora._compat.objects import (  # noqa: F401
    _GRAPH_STATE,
    _rebound,
    _retrack,
    become,
    name_scope_at,
    own_scope,
    parent_path,
    restore,
    scope_of,
    snapshot,
)
from tf_lora._compat.training import (  # noqa: F401
    TRACED_FUNCTIONS,
    _CALL_STATE,
    averages_replica_gradients,
    call_state,
    copy_variable,
    copy_weight_decay_exclusions,
    current_call_state,
    gradient_tape_recording,
    is_distribution_strategy,
    is_framework_tensor,
    is_traced_function,
    optimizer_uses_weight_decay,
    optimizer_variable_index,
    optimizer_variables,
    remap_tracked_ids,
    reset_traced_functions,
    unscale_loss,
    unscaled_value,
)
from tf_lora._compat.runtime import (  # noqa: F401
    MultiWorkerTrainer,
    _keras_reduces_across_workers,
    defer_value,
    deferred_variables,
    forget_deferred,
    graph_rewrites,
    initialize_variable,
    is_initialized,
    local_replica_batch,
    model_strategy,
    redirect_backup,
    reduced_precision_float32,
    reduces_across_workers,
    replica_outputs,
    set_initial_epoch,
    set_model_strategy,
    wrap_generate_functions,
)
