"""The label audit: out-of-fold scores, confident learning over them, the review page, and applying fixes."""
