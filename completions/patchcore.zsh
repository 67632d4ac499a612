#compdef patchcore

_patchcore_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PATCHCORE_COMPLETE=complete_zsh patchcore)
}

compdef _patchcore_completion patchcore
