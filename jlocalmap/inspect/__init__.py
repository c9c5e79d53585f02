"""Inspection: reading traced programs (regions, residuals), communication counts and layout views."""
