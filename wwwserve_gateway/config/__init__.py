"""The provider's policy file: its schema (`schema`), loading (`loading`) and error reports (`problems`)."""
