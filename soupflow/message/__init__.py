"""DICOM object -> DICOM message JSON (Association, CommonFields, Report, Tags). Pure."""
