"""One module per CNI plugin; each defines COMMANDS and main()."""
