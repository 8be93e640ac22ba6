// Command docker-credential-pullsecret is a docker-credential-helpers
// helper that resolves pull secrets at pull time. Name it in a client's
// config.json (credHelpers or credsStore) or auth.json.
package main

import (
	"fmt"
	"os"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/credhelper"
	"github.com/pullsecret/pullsecret/secret"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	credentials.Name = "docker-credential-pullsecret"
	credentials.Package = "github.com/pullsecret/pullsecret"
	credentials.Version = version

	store, err := secret.OpenFromEnv(os.Getenv)
	if err != nil {
		// The protocol reads errors from stdout; exit 1.
		fmt.Fprintln(os.Stdout, "pullsecret:", err)
		os.Exit(1)
	}
	credentials.Serve(credhelper.NewLocal(store, credhelper.WithProject(os.Getenv("PULLSECRET_PROJECT"))))
}
