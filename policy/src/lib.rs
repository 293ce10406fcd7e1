//! Policy YAML: schema, validation, evaluation (filled by the policy issue).
