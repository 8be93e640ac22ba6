package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/spec"
)

func specCommand() *command {
	return &command{
		summary: "Plan and pull a service spec's image (container.pull_secret)",
		sub: map[string]*command{
			"plan": {summary: "Check a service spec and print its pull plan and runtime plan (names only)", usage: specPlanUsage, run: (*cli).specPlan},
			"pull": {summary: "Pull a service spec's image now with its pull secret, and print the pinned runtime plan", usage: specPullUsage, run: (*cli).specPull},
		},
	}
}

const specFlagsUsage = `  --via direct|proxy    pull from the image's registry with the pull secret
                        (direct, the default) or through pullsecret serve with
                        a project pull token (proxy)
  --server URL          the pullsecret server, for --via proxy
                        (default: $PULLSECRET_SERVER)
  --upstream-alias NAME the name the proxy knows the image's registry by (an
                        alias of its config); needed for a registry host with
                        a port
  -o, --output FORMAT   text (default) or json
` + commonFlagsUsage

const specPlanUsage = `Usage: pullsecret spec plan FILE [--project P] [--via direct|proxy] [-o text|json]

Check a service spec against the project's pull secrets and print its two
plans: the pull plan (image, registry, the image pull secret's name, how it
is pulled) and the runtime plan (image, environment, runtime secrets). Only
names are printed, never a secret value.

Errors (each with FILE:LINE) exit 1: malformed YAML, an unknown field, a
pull secret that does not exist in the project or does not cover the image,
an image pull secret used as a runtime secret or in the environment. A
literal environment value that looks like a credential is a warning.

Flags:
` + specFlagsUsage

const specPullUsage = `Usage: pullsecret spec pull FILE [--project P] [--via direct|proxy] [--runtime RUNTIME] [--server URL] [--token-file F]

Pull the spec's image now, resolving its pull secret at this moment, then
print the runtime plan with the image pinned by digest. The credential goes
to the runtime only, through temporary configuration removed afterwards:

  docker, podman   a temporary DOCKER_CONFIG / auth file whose credHelpers name
                   docker-credential-pullsecret (found next to this program
                   or on PATH) for the registry; via the proxy, a login with
                   the project pull token
  containerd       a temporary --hosts-dir whose hosts.toml (mode 0600)
                   carries the Authorization header: ctr calls no helper
  oci-layout:DIR   go-containerregistry, into an OCI image layout in DIR

The runtime programs are docker, podman and ctr on PATH, or the ones named
by PULLSECRET_DOCKER, PULLSECRET_PODMAN and PULLSECRET_CTR; DOCKER_HOST,
CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE and the like pass through.

Flags:
  --runtime RUNTIME     docker (default), podman, containerd or oci-layout:DIR
  --insecure            allow plain HTTP or unverified TLS to the registry/proxy
  --token-file FILE     via proxy: the project pull token (default:
                        $PULLSECRET_TOKEN_FILE, else $PULLSECRET_TOKEN, else,
                        on the server's machine, a pull token minted for this
                        repository for 10 minutes and revoked after the pull)
` + specFlagsUsage

// specFlags are the flags plan and pull share.
type specFlags struct {
	co     *common
	via    *string
	server *string
	alias  *string
	out    *string
}

func (c *cli) specFlagSet(name string) (*flag.FlagSet, *specFlags) {
	fs := newFlagSet(name)
	sf := &specFlags{co: c.commonFlags(fs), out: outputFlag(fs, "text")}
	sf.via = fs.String("via", spec.ViaDirect, "")
	sf.server = fs.String("server", "", "")
	sf.alias = fs.String("upstream-alias", "", "")
	return fs, sf
}

// loadPlan reads FILE and plans it. Diagnostics go to stderr (and, with -o
// json, the errors to stdout as JSON); spec errors exit 1.
func (c *cli) loadPlan(pos []string, sf *specFlags, usage string) (*spec.Plan, *secret.Store, *url.URL, error) {
	if len(pos) != 1 {
		if len(pos) == 0 {
			return nil, nil, nil, &usageError{msg: "missing spec FILE", usage: usage}
		}
		return nil, nil, nil, &usageError{msg: fmt.Sprintf("unexpected argument %q", printable(pos[1])), usage: usage}
	}
	if err := checkOutput(*sf.out, usage, "text", "json"); err != nil {
		return nil, nil, nil, err
	}
	if *sf.via != spec.ViaDirect && *sf.via != spec.ViaProxy {
		return nil, nil, nil, &usageError{msg: fmt.Sprintf("--via %q: want direct or proxy", printable(*sf.via)), usage: usage}
	}
	project, err := c.projectName(sf.co)
	if err != nil {
		return nil, nil, nil, err
	}
	opts := spec.Options{Project: project, Via: *sf.via, UpstreamAlias: *sf.alias}
	if *sf.alias != "" && *sf.via != spec.ViaProxy {
		return nil, nil, nil, &usageError{msg: "--upstream-alias goes with --via proxy", usage: usage}
	}
	var server *url.URL
	if *sf.via == spec.ViaProxy {
		s := *sf.server
		if s == "" {
			s = c.getenv("PULLSECRET_SERVER")
		}
		if s != "" {
			u, err := url.Parse(s)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
				return nil, nil, nil, &usageError{msg: "--server: want http(s)://HOST[:PORT]", usage: usage}
			}
			server = u
			opts.Proxy = u.Host
		}
	}
	file := pos[0]
	s, err := spec.ReadFile(file)
	if err != nil {
		return nil, nil, nil, c.specErrors(file, err, *sf.out)
	}
	store, err := c.openStore(sf.co)
	if err != nil {
		return nil, nil, nil, err
	}
	plan, err := spec.MakePlan(c.ctx, s, store, opts)
	if err != nil {
		return nil, nil, nil, c.specErrors(file, err, *sf.out)
	}
	for _, w := range plan.Warnings {
		fmt.Fprintf(c.stderr, "warning: %s\n", w)
	}
	return plan, store, server, nil
}

// specErrors prints a spec's diagnostics and returns the error that exits
// 1.
func (c *cli) specErrors(file string, err error, out string) error {
	var se *spec.Error
	if !errors.As(err, &se) {
		return err
	}
	errs, warns := se.Diagnostics, se.Warnings
	for _, d := range errs {
		fmt.Fprintf(c.stderr, "%s\n", d)
	}
	for _, d := range warns {
		fmt.Fprintf(c.stderr, "warning: %s\n", d)
	}
	if out == "json" {
		if warns == nil {
			warns = []spec.Diagnostic{}
		}
		_ = writeJSON(c, map[string]any{"file": file, "errors": errs, "warnings": warns})
	}
	n := len(errs)
	if n == 1 {
		return fmt.Errorf("%s: 1 error", file)
	}
	return fmt.Errorf("%s: %d errors", file, n)
}

func (c *cli) specPlan(args []string) error {
	fs, sf := c.specFlagSet("plan")
	pos, err := c.parseFlags(fs, args, specPlanUsage)
	if err != nil {
		return err
	}
	plan, _, _, err := c.loadPlan(pos, sf, specPlanUsage)
	if err != nil {
		return err
	}
	if *sf.out == "json" {
		return writeJSON(c, plan)
	}
	return printPlan(c.stdout, plan, true)
}

func (c *cli) specPull(args []string) error {
	fs, sf := c.specFlagSet("pull")
	runtimeFlag := fs.String("runtime", spec.RuntimeDocker, "")
	insecure := fs.Bool("insecure", false, "")
	tokenFile := fs.String("token-file", "", "")
	pos, err := c.parseFlags(fs, args, specPullUsage)
	if err != nil {
		return err
	}
	rt, err := spec.ParseRuntime(*runtimeFlag)
	if err != nil {
		return &usageError{msg: err.Error(), usage: specPullUsage}
	}
	plan, store, server, err := c.loadPlan(pos, sf, specPullUsage)
	if err != nil {
		return err
	}
	o := spec.PullOptions{Runtime: rt, Store: store, Insecure: *insecure, Progress: c.stderr, Env: c.pullEnv(store)}
	if plan.Pull.Via == spec.ViaProxy {
		if server == nil {
			return &usageError{msg: "--via proxy needs the server: --server URL or PULLSECRET_SERVER", usage: specPullUsage}
		}
		o.ProxyScheme = server.Scheme
		var done func()
		if o.Token, done, err = c.pullToken(*tokenFile, store, plan); err != nil {
			return err
		}
		defer done()
	}
	how := "directly from " + plan.Pull.Registry
	if plan.Pull.PullSecret != "" {
		how += " with pull secret " + plan.Pull.PullSecret
	}
	if plan.Pull.Via == spec.ViaProxy {
		how = "through the proxy " + plan.Pull.Proxy + " with a project pull token"
	}
	fmt.Fprintf(c.stderr, "pulling %s with %s, %s\n", plan.Pull.PullImage, rt, how)
	if err := spec.Pull(c.ctx, plan, o); err != nil {
		return err
	}
	if *sf.out == "json" {
		return writeJSON(c, plan)
	}
	return printPlan(c.stdout, plan, false)
}

// pullEnv is the environment of the runtime: this process's, with the
// store's home for the helper.
func (c *cli) pullEnv(store *secret.Store) []string {
	env := os.Environ()
	set := func(k, v string) {
		for i, kv := range env {
			if strings.HasPrefix(kv, k+"=") {
				env[i] = k + "=" + v
				return
			}
		}
		env = append(env, k+"="+v)
	}
	set("PULLSECRET_HOME", store.Home())
	for _, k := range []string{"PULLSECRET_KEY_FILE", "PULLSECRET_DOCKER", "PULLSECRET_PODMAN", "PULLSECRET_CTR"} {
		if v := c.getenv(k); v != "" {
			set(k, v)
		}
	}
	return env
}

// pullTokenTTL is the life of a pull token minted for one pull.
const pullTokenTTL = 10 * time.Minute

// pullToken is the project pull token for a pull through the proxy:
// --token-file, else $PULLSECRET_TOKEN_FILE, else $PULLSECRET_TOKEN, else,
// on the server's own machine (its token store is in the data folder), a
// pull token minted for this repository that lives ten minutes and is
// revoked by done once the pull is over.
func (c *cli) pullToken(file string, store *secret.Store, plan *spec.Plan) (tok string, done func(), err error) {
	done = func() {}
	if file == "" {
		file = c.getenv("PULLSECRET_TOKEN_FILE")
	}
	if file != "" {
		tok, err = c.readValue("pull token", false, file)
		return tok, done, err
	}
	if t := strings.TrimSpace(c.getenv("PULLSECRET_TOKEN")); t != "" {
		return t, done, nil
	}
	ts, err := c.pullTokenStore(store)
	if err != nil {
		return "", done, err
	}
	if ts != nil {
		repo := plan.Pull.Upstream + "/" + plan.Pull.Repository
		tok, exp, err := ts.IssuePullToken(c.ctx, plan.Project, repo, pullTokenTTL)
		if err != nil {
			return "", done, fmt.Errorf("mint a pull token: %w", err)
		}
		fmt.Fprintf(c.stderr, "note: minted a pull token for %s in project %s, valid until %s and revoked after the pull\n", repo, plan.Project, exp.UTC().Format(time.RFC3339))
		done = func() {
			if id, ok := proxy.ParseTokenID(tok); ok {
				if _, err := ts.Revoke(context.WithoutCancel(c.ctx), id); err != nil {
					fmt.Fprintf(c.stderr, "warning: could not revoke the pull token %s: %v (it expires on its own)\n", id, err)
				}
			}
		}
		return tok, done, nil
	}
	return "", done, errors.New("--via proxy needs a project pull token: --token-file FILE, PULLSECRET_TOKEN_FILE or PULLSECRET_TOKEN (pullsecret token create --project P --scope pull --ttl 15m)")
}

// pullTokenStore is the server's token store when this machine reaches
// it: the metadata database of $PULLSECRET_CONFIG (metadata driver
// postgres), else tokens.json in the data folder; nil when neither.
func (c *cli) pullTokenStore(store *secret.Store) (*proxy.TokenStore, error) {
	if ts, _, err := c.databaseTokenStore(nil); ts != nil || err != nil {
		return ts, err
	}
	b, err := proxy.NewFileTokenBackend(store.Home(), nil)
	if err != nil || !fileExists(b.Path()) {
		return nil, nil
	}
	return proxy.NewTokenStore(store.Home(), proxy.WithTokenBackend(b))
}

// printPlan prints the plans for people. The pull plan is left out after a
// pull: it has done its work, and only the runtime plan goes on.
func printPlan(w io.Writer, p *spec.Plan, withPull bool) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "service %s (project %s, %s)\n", p.Service, p.Project, p.File)
	if withPull {
		fmt.Fprintln(tw, "\npull plan (read while pulling, and only then):")
		fmt.Fprintf(tw, "  image\t%s\n", p.Pull.Image)
		fmt.Fprintf(tw, "  registry\t%s\n", p.Pull.Registry)
		fmt.Fprintf(tw, "  repository\t%s\n", p.Pull.Repository)
		if p.Pull.PullSecret != "" {
			fmt.Fprintf(tw, "  pull secret\t%s (covers %s)\n", p.Pull.PullSecret, p.Pull.SecretRegistry)
		} else {
			fmt.Fprintf(tw, "  pull secret\tnone (anonymous pull)\n")
		}
		switch {
		case p.Pull.Via == spec.ViaProxy && p.Pull.Proxy != "":
			fmt.Fprintf(tw, "  via\tproxy %s, as %s, with a project pull token\n", p.Pull.Proxy, p.Pull.PullImage)
		case p.Pull.Via == spec.ViaProxy:
			fmt.Fprintf(tw, "  via\tproxy (--server or PULLSECRET_SERVER names it), with a project pull token\n")
		default:
			fmt.Fprintf(tw, "  via\tdirect, the credential helper resolving the pull secret at pull time\n")
		}
	}
	fmt.Fprintln(tw, "\nruntime plan (what the running container gets):")
	pin := "not pinned yet: pinned by digest at pull time"
	if p.Runtime.Pinned {
		pin = "pinned by digest"
	}
	fmt.Fprintf(tw, "  image\t%s (%s)\n", p.Runtime.Image, pin)
	if len(p.Runtime.Environment) == 0 {
		fmt.Fprintf(tw, "  environment\tnone\n")
	}
	for i, e := range p.Runtime.Environment {
		label := ""
		if i == 0 {
			label = "environment"
		}
		switch {
		case e.Secret != nil:
			fmt.Fprintf(tw, "  %s\t%s from secret %s, key %s\n", label, e.Name, e.Secret.Name, e.Secret.Key)
		case e.Redacted:
			fmt.Fprintf(tw, "  %s\t%s=<left out: looks like a credential>\n", label, e.Name)
		default:
			fmt.Fprintf(tw, "  %s\t%s=%s\n", label, e.Name, *e.Value)
		}
	}
	if len(p.Runtime.Secrets) == 0 {
		fmt.Fprintf(tw, "  secrets\tnone\n")
	}
	for i, s := range p.Runtime.Secrets {
		label := ""
		if i == 0 {
			label = "secrets"
		}
		fmt.Fprintf(tw, "  %s\t%s, mounted at %s (a file per key)\n", label, s.Name, s.Path)
	}
	return tw.Flush()
}
