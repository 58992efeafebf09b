"""Published evidence tables (CSV), installed as carkin.evidence_tables; see README.md here."""
