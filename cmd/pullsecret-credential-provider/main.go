// Command pullsecret-credential-provider is a kubelet image credential
// provider plugin (credentialprovider.kubelet.k8s.io/v1). Kubelet runs it
// with a CredentialProviderRequest on stdin and reads a
// CredentialProviderResponse from stdout.
//
// Server mode (the one to use on shared nodes): with --server URL or
// PULLSECRET_SERVER, the pod's service account token (kubelet's
// tokenAttributes, KEP-4412) and annotations go to `pullsecret serve`, which
// verifies the token, maps the service account to its project and answers
// with that project's credential for the image, or a short-lived pull token
// when the image is on the proxy. A pod whose service account has no
// binding gets an empty auth, never another project's secret.
//
// Local mode: with no server, the image is resolved from the sealed store
// in PULLSECRET_HOME for one project (--project or PULLSECRET_PROJECT,
// default "default"); ECR secrets are exchanged for registry tokens here. Every pod on the node whose image matches gets that
// project's credential: use it only on nodes that run a single project.
//
// Configure it with `pullsecret configure kubelet`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/pullsecret/pullsecret/credhelper/kubelet"
	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/secret/awsecr"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdin, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "pullsecret-credential-provider:", err)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pullsecret-credential-provider", flag.ContinueOnError)
	fs.SetOutput(stderr)
	server := fs.String("server", getenv("PULLSECRET_SERVER"), "pullsecret server URL (env PULLSECRET_SERVER); empty: resolve from the local store")
	caFile := fs.String("ca-file", getenv("PULLSECRET_CA_FILE"), "PEM CA certificate to trust for the server, besides the system roots (env PULLSECRET_CA_FILE)")
	project := fs.String("project", getenv("PULLSECRET_PROJECT"), "local mode: the project whose pull secrets are used (env PULLSECRET_PROJECT)")
	timeout := fs.Duration("timeout", kubelet.DefaultProviderTimeout, "bound on one request, well under kubelet's one minute")
	cacheDur := fs.Duration("default-cache-duration", kubelet.DefaultProviderCacheDuration, "cache duration of a credential that does not expire (one that does gets at most half its remaining life)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: pullsecret-credential-provider [flags] < CredentialProviderRequest\n\n"+
			"The kubelet image credential provider plugin (%s).\n\nflags:\n", kubelet.ProviderAPIVersion)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *showVersion {
		fmt.Fprintln(stdout, "pullsecret-credential-provider", version)
		return nil
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *timeout <= 0 || *timeout > 50*time.Second {
		return fmt.Errorf("--timeout %s: want more than 0 and at most 50s (kubelet gives the plugin one minute)", *timeout)
	}
	var src kubelet.ProviderSource
	if *server != "" {
		r, err := kubelet.NewRemoteProviderSource(*server, *caFile, *timeout)
		if err != nil {
			return err
		}
		src = r
	} else {
		// ECR secrets are exchanged for registry tokens in this process (and
		// kept, sealed, in the home until they near expiry).
		store, err := secret.OpenFromEnv(getenv, secret.WithDiskCachedECR(awsecr.NewFromEnv(getenv)))
		if err != nil {
			return err
		}
		p := *project
		if p == "" {
			p = secret.DefaultProject
		}
		src = &kubelet.LocalProviderSource{Store: store, Project: p}
	}
	prov := &kubelet.Provider{Source: src, Timeout: *timeout, DefaultCacheDuration: *cacheDur}
	return prov.Serve(ctx, stdin, stdout)
}
