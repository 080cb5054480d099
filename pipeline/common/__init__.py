"""What both halves use, whatever the model: the JSONL row schema (``records``), options declared as fields
(``options``) and the flags both CLIs share (``flags``), images (``images``) and embedding variants
(``variants``), where a process sits and its collectives (``process_group``, ``collective``), devices, DataLoader
workers, logging and contact sheets (``preview``)."""
