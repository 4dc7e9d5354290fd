"""Dataset readers: every annotation format becomes the same `Record` list.

Supported: CUHK-PEDES `reid_raw.json`, ICFG-PEDES `ICFG-PEDES.json` (and our synthetic
benchmark's `annotations.json`, the same layout plus `camera`/`node`), RSTPReid
`data_captions.json`, Flickr30k `results.csv`, and a plain CSV
(`image,caption,person_id,camera_id[,split][,timestamp_ms]`).
"""

from common.datasets.readers import (
    FORMATS,
    DatasetLoad,
    Record,
    detect_format,
    load_records,
    read_dataset,
)

__all__ = ["FORMATS", "DatasetLoad", "Record", "detect_format", "load_records", "read_dataset"]
