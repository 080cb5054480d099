"""Checkpoints: the manager (folders published atomically, integrity records, resume) and the parts it saves.

``manager`` knows folders and files; ``parts`` knows what each piece of the run's
state is and how it is written.  Both are reached through this package.
"""

from pipeline.train.engine.checkpoint.manager import (  # noqa: F401
    MARKER,
    CheckpointDamaged,
    CheckpointManager,
    NonFiniteState,
    check_files,
    check_mode,
    checkpoint_files,
    clean_stale,
    complete_checkpoints,
    damage_of,
    file_owner,
    file_record,
    final_dir,
    marker_or_none,
    prune,
    read_json_object,
    read_marker,
    resolve_resume,
    resume_point,
    save_checkpoint,
    set_aside_newer,
    staging_dir,
    step_of,
    write_json_file,
)
from pipeline.train.engine.checkpoint.parts import (  # noqa: F401
    DataPart,
    FSDPShards,
    JsonPart,
    LoraFiles,
    ReplicatedWeights,
    RngPart,
    optimizer_from_files,
    optimizer_to_files,
)
