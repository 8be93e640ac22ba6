package main

import (
	"fmt"
	"io"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/credhelper/remote"
)

// credentialHelperArg is the hidden command that docker-credential-pullsecret
// execs in remote mode (PULLSECRET_SERVER set): the helper itself links no
// net/http, so that the local mode, which starts on every pull, stays as
// cheap as a process can be.
const credentialHelperArg = "__credential-helper"

// serveCredentialHelper answers one docker-credential-helpers verb in
// remote mode, with the protocol's conventions: errors on stdout, exit 1.
func serveCredentialHelper(verb string, stdin io.Reader, stdout io.Writer, getenv func(string) string) int {
	h, err := remote.FromEnv(getenv)
	if err != nil {
		fmt.Fprintln(stdout, "pullsecret:", err)
		return 1
	}
	switch verb {
	case "version", "--version", "-v":
		fmt.Fprintf(stdout, "docker-credential-pullsecret (github.com/pullsecret/pullsecret) %s (remote mode, server %s)\n", version, h.Server())
		return 0
	}
	if err := credentials.HandleCommand(h, verb, stdin, stdout); err != nil {
		fmt.Fprintln(stdout, err)
		return 1
	}
	return 0
}
