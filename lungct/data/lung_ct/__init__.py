"""TFDS builder for lung CT volumes (synthetic phantoms and nodules, folder + CSV, DICOM,
MosMedData, MedMNIST)."""
from lungct.data.lung_ct.lung_ct import (
    INDEX_FILE,
    REPORT_FILE,
    SOURCES,
    SPLITS,
    Item,
    make_example,
    LungCt,
    LungCtConfig,
    builder_for,
    changes_dataset,
    check_classes,
    config_name,
    data_config,
    list_folder_items,
    list_mosmeddata_items,
    prepare,
    read_build_report,
    split_index,
    split_patients,
    summary_lines,
    written_splits,
)

__all__ = [
    "INDEX_FILE", "REPORT_FILE", "SOURCES", "SPLITS", "Item", "make_example",
    "LungCt", "LungCtConfig", "builder_for", "changes_dataset", "check_classes", "config_name", "data_config", "list_folder_items",
    "list_mosmeddata_items", "prepare", "read_build_report", "split_index", "split_patients",
    "summary_lines", "written_splits",
]
