"""Da Vinci DTR 2.2 documentation forms: a FHIR Questionnaire per policy (``policies/forms/``), the
``$questionnaire-package`` operation, the server's pre-filled answers, and what a completed form adds to
the record on the next hook call."""
