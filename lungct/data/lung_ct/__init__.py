"""TFDS builder for lung CT volumes (synthetic phantoms, MosMedData, folder + CSV)."""
from lungct.data.lung_ct.lung_ct import (
    REPORT_FILE,
    SOURCES,
    SPLITS,
    Item,
    make_example,
    LungCt,
    LungCtConfig,
    builder_for,
    config_name,
    list_folder_items,
    list_mosmeddata_items,
    prepare,
    read_build_report,
    split_index,
    split_patients,
)

__all__ = [
    "REPORT_FILE", "SOURCES", "SPLITS", "Item", "make_example",
    "LungCt", "LungCtConfig", "builder_for", "config_name", "list_folder_items",
    "list_mosmeddata_items", "prepare", "read_build_report", "split_index", "split_patients",
]
