"""CNPJ-specific jobs: schemas, parse rules and the sample-month generator."""
