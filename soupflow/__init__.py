"""soupflow: a DICOM workflow runtime for Integration Soup workflow files."""
