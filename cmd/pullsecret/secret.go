package main

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pullsecret/pullsecret/credhelper"
	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/secret/dockerconfig"
)

func secretCommand() *command {
	return &command{
		summary: "Manage pull secrets (registry credentials)",
		sub: map[string]*command{
			"create": {summary: "Store a new pull secret", usage: createUsage, run: (*cli).secretCreate},
			"import": {summary: "Import the registries of a Docker config or .dockerconfigjson", usage: importUsage, run: (*cli).secretImport},
			"list":   {summary: "List pull secrets (metadata only)", usage: listUsage, run: (*cli).secretList},
			"show":   {summary: "Show a pull secret's metadata (never its value)", usage: showUsage, run: (*cli).secretShow},
			"rotate": {summary: "Replace a pull secret's value", usage: rotateUsage, run: (*cli).secretRotate},
			"delete": {summary: "Delete a pull secret", usage: deleteUsage, run: (*cli).secretDelete},
		},
	}
}

const commonFlagsUsage = `  --project P           project (default: $PULLSECRET_PROJECT, else "default")
  --home DIR            data folder (default: $PULLSECRET_HOME)
`

const createUsage = `Usage: pullsecret secret create NAME --registry HOST[/PREFIX] [--registry ...] --username USER --password-stdin [--project P]
       pullsecret secret create NAME --registry HOST[/PREFIX] [--registry ...] --token-stdin [--project P]
` + createECRUsage + `
Store a new pull secret. The value is read from standard input (or a file),
never from the command line; one trailing newline is trimmed. NAME is a
lowercase DNS label (letters, digits and '-').

Flags:
  --registry PATTERN    registry the secret is for: HOST[:PORT][/PREFIX]; a prefix
                        covers that repository path and those below it. Repeatable.
  --username USER       user name, with --password-stdin or --password-file
  --password-stdin      read the password from standard input
  --password-file FILE  read the password from FILE
  --token-stdin         read an identity (refresh) token from standard input
  --token-file FILE     read an identity token from FILE
` + commonFlagsUsage + configFlagUsage + createECRFlagsUsage + `
Example:
  printf '%s' "$REGISTRY_PASSWORD" | pullsecret secret create ghcr-acme \
      --registry ghcr.io/acme --username acme-bot --password-stdin
`

const importUsage = `Usage: pullsecret secret import --from-dockerconfig FILE [--project P]

Import every registry credential of FILE as one pull secret per registry,
named after the registry. FILE ("-" for standard input) is a Docker
config.json, a Kubernetes .dockerconfigjson, or a Kubernetes Secret manifest
(JSON or YAML) holding one. Entries without a credential (those a credsStore
keeps) are skipped with a note. Importing the same file again changes
nothing; a changed credential updates its secret.

Flags:
  --from-dockerconfig FILE  the file to import ("-" for standard input)
` + commonFlagsUsage + configFlagUsage

const listUsage = `Usage: pullsecret secret list [--project P | --all-projects] [-o table|json]

List pull secrets: metadata only, never a value. The table has the columns
NAME KIND REGISTRIES VERSION UPDATED (and PROJECT first with --all-projects).

Flags:
  -o, --output FORMAT   table (default) or json
  --all-projects        list the secrets of every project
` + commonFlagsUsage + configFlagUsage

const showUsage = `Usage: pullsecret secret show NAME [--project P] [-o text|json]

Show a pull secret's metadata. Neither the value nor the user name is ever
shown.

Flags:
  -o, --output FORMAT   text (default) or json
` + commonFlagsUsage + configFlagUsage

const rotateUsage = `Usage: pullsecret secret rotate NAME --password-stdin [--username USER] [--project P]
       pullsecret secret rotate NAME --token-stdin [--project P]

Replace a pull secret's value, keeping its kind and registries. A basic
secret keeps its user name unless --username is given.

Flags:
  --username USER       new user name (basic secrets)
  --password-stdin      read the new password from standard input
  --password-file FILE  read the new password from FILE
  --token-stdin         read the new identity token from standard input
  --token-file FILE     read the new identity token from FILE
` + commonFlagsUsage + configFlagUsage

const deleteUsage = `Usage: pullsecret secret delete NAME [--project P]

Delete a pull secret.

Flags:
` + commonFlagsUsage + configFlagUsage

// oneName checks that exactly one positional argument, NAME, was given.
// secretStore checks the project and the secret name of a command on one
// secret, then opens the store: nothing is created for a bad name.
func (c *cli) secretStore(co *common, name string) (*secret.Store, string, error) {
	project, err := c.projectName(co)
	if err != nil {
		return nil, "", err
	}
	if err := validSecretName(name); err != nil {
		return nil, "", err
	}
	store, err := c.openStore(co)
	if err != nil {
		return nil, "", err
	}
	return store, project, nil
}

func oneName(pos []string, usage string) (string, error) {
	switch len(pos) {
	case 0:
		return "", &usageError{msg: "missing NAME", usage: usage}
	case 1:
		return pos[0], nil
	}
	return "", &usageError{msg: fmt.Sprintf("unexpected argument %q", printable(pos[1])), usage: usage}
}

func noArgs(pos []string, usage string) error {
	if len(pos) > 0 {
		return &usageError{msg: fmt.Sprintf("unexpected argument %q", printable(pos[0])), usage: usage}
	}
	return nil
}

// validSecretName checks NAME before anything else happens.
func validSecretName(name string) error {
	if err := secret.ValidName(name); err != nil {
		return fmt.Errorf("secret name: %w", err)
	}
	return nil
}

// valueFlags say where a secret's value comes from.
type valueFlags struct {
	username                  string
	passwordStdin, tokenStdin bool
	passwordFile, tokenFile   string
}

func (v *valueFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&v.username, "username", "", "")
	fs.BoolVar(&v.passwordStdin, "password-stdin", false, "")
	fs.StringVar(&v.passwordFile, "password-file", "", "")
	fs.BoolVar(&v.tokenStdin, "token-stdin", false, "")
	fs.StringVar(&v.tokenFile, "token-file", "", "")
}

// source checks the flags and says which kind of value to read, and from
// where.
func (v *valueFlags) source(usage string) (kind secret.Kind, stdin bool, file string, err error) {
	var set []string
	if v.passwordStdin {
		set, kind, stdin = append(set, "--password-stdin"), secret.Basic, true
	}
	if v.passwordFile != "" {
		set, kind, file = append(set, "--password-file"), secret.Basic, v.passwordFile
	}
	if v.tokenStdin {
		set, kind, stdin = append(set, "--token-stdin"), secret.Token, true
	}
	if v.tokenFile != "" {
		set, kind, file = append(set, "--token-file"), secret.Token, v.tokenFile
	}
	switch len(set) {
	case 0:
		return "", false, "", &usageError{msg: "the value is read from standard input: give --password-stdin or --token-stdin", usage: usage}
	case 1:
	default:
		return "", false, "", &usageError{msg: fmt.Sprintf("%s cannot be used together", strings.Join(set, " and ")), usage: usage}
	}
	if kind == secret.Token && v.username != "" {
		return "", false, "", &usageError{msg: "--username goes with a password, not with a token", usage: usage}
	}
	return kind, stdin, file, nil
}

// read reads the value the flags name.
func (v *valueFlags) read(c *cli, kind secret.Kind, stdin bool, file string) (secret.Value, error) {
	if kind == secret.Token {
		tok, err := c.readValue("token", stdin, file)
		return secret.Value{IdentityToken: tok}, err
	}
	pw, err := c.readValue("password", stdin, file)
	return secret.Value{Username: v.username, Password: pw}, err
}

func validUsername(u string) error {
	if strings.ContainsRune(u, ':') {
		return errors.New("--username must not contain ':'")
	}
	if strings.ContainsFunc(u, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return errors.New("--username must not contain control characters")
	}
	return nil
}

// safeArg prints a command-line value that may be a URL without any user
// info in it.
func safeArg(s string) string {
	rest, scheme := s, ""
	if i := strings.Index(rest, "://"); i >= 0 {
		scheme, rest = rest[:i+3], rest[i+3:]
	}
	host, path, hasPath := strings.Cut(rest, "/")
	if i := strings.LastIndex(host, "@"); i >= 0 {
		host = "***@" + host[i+1:]
	}
	s = scheme + host
	if hasPath {
		s += "/" + path
	}
	return printable(s)
}

func (c *cli) secretCreate(args []string) error {
	fs := newFlagSet("create")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	var regs stringList
	fs.Var(&regs, "registry", "")
	var vf valueFlags
	vf.register(fs)
	var ef ecrFlags
	ef.register(fs)
	pos, err := c.parseFlags(fs, args, createUsage)
	if err != nil {
		return err
	}
	name, err := oneName(pos, createUsage)
	if err != nil {
		return err
	}
	if len(regs) == 0 {
		return &usageError{msg: "--registry is required", usage: createUsage}
	}
	if err := ef.check(&vf, createUsage); err != nil {
		return err
	}
	kind, stdin, file := secret.ECR, false, ""
	if !ef.ecr {
		if kind, stdin, file, err = vf.source(createUsage); err != nil {
			return err
		}
		if kind == secret.Basic && vf.username == "" {
			return &usageError{msg: "--username is required with a password", usage: createUsage}
		}
	}
	project, err := c.projectName(co)
	if err != nil {
		return err
	}
	if err := validSecretName(name); err != nil {
		return err
	}
	if err := validUsername(vf.username); err != nil {
		return err
	}
	var pats []secret.Pattern
	for _, r := range regs {
		p, err := secret.ParsePattern(r)
		if err != nil {
			return fmt.Errorf("--registry %q: %w", safeArg(r), err)
		}
		pats = append(pats, p)
	}
	store, err := c.openStore(co)
	if err != nil {
		return err
	}
	var v secret.Value
	if ef.ecr {
		v, err = ef.value(c)
	} else {
		v, err = vf.read(c, kind, stdin, file)
	}
	if err != nil {
		return err
	}
	sec, err := store.Create(c.ctx, secret.Secret{Project: project, Name: name, Kind: kind, Registries: pats}, v)
	if errors.Is(err, secret.ErrExists) {
		return fmt.Errorf("%w (use 'pullsecret secret rotate %s' to change its value)", err, name)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "created secret %s for %s (%s, project %s)\n", sec.Name, joinPatterns(sec.Registries), sec.Kind, sec.Project)
	return nil
}

func joinPatterns(ps []secret.Pattern) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = string(p)
	}
	return strings.Join(s, ",")
}

// importStep is what the import does for one registry.
type importStep struct {
	cred    dockerconfig.DockerCredential
	name    string
	existed bool
}

func (c *cli) secretImport(args []string) error {
	fs := newFlagSet("import")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	var from string
	fs.StringVar(&from, "from-dockerconfig", "", "")
	pos, err := c.parseFlags(fs, args, importUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, importUsage); err != nil {
		return err
	}
	if from == "" {
		return &usageError{msg: "--from-dockerconfig FILE is required", usage: importUsage}
	}
	project, err := c.projectName(co)
	if err != nil {
		return err
	}
	data, err := c.readFile(from, dockerconfig.MaxDockerConfigSize)
	if err != nil {
		return err
	}
	defer clear(data)
	label := from
	if from == "-" {
		label = "standard input"
	}
	cfg, err := dockerconfig.ParseDockerConfig(data)
	if err != nil {
		return fmt.Errorf("%s: %w", label, err)
	}
	for _, n := range cfg.Skipped {
		fmt.Fprintf(c.stderr, "pullsecret: note: skipped %s: %s\n", n.Key, n.Reason)
	}
	if len(cfg.Credentials) == 0 {
		return fmt.Errorf("%s: no registry credential to import", label)
	}
	store, err := c.openStore(co)
	if err != nil {
		return err
	}
	existing, err := store.List(c.ctx, project)
	if err != nil {
		return err
	}
	steps, err := planImport(project, existing, cfg.Credentials)
	if err != nil {
		return err
	}
	for _, st := range steps {
		k, reg := st.cred.Kind, st.cred.Registry
		if st.existed {
			old, v, err := store.Value(c.ctx, project, st.name)
			if err == nil && old.Kind == k && sameValue(v, st.cred.Value) {
				fmt.Fprintf(c.stdout, "imported %s for %s (%s, version %d, unchanged)\n", st.name, reg, k, old.Version)
				continue
			}
		}
		sec, err := store.Put(c.ctx, secret.Secret{Project: project, Name: st.name, Kind: k, Registries: []secret.Pattern{reg}}, st.cred.Value)
		if err != nil {
			return fmt.Errorf("import %s as %s: %w", reg, st.name, err)
		}
		what := "created"
		if st.existed {
			what = "updated"
		}
		fmt.Fprintf(c.stdout, "imported %s for %s (%s, version %d, %s)\n", sec.Name, reg, sec.Kind, sec.Version, what)
	}
	return nil
}

func sameValue(a, b secret.Value) bool {
	eq := func(x, y string) bool { return subtle.ConstantTimeCompare([]byte(x), []byte(y)) == 1 }
	return a.AWS == nil && b.AWS == nil && eq(a.Username, b.Username) && eq(a.Password, b.Password) && eq(a.IdentityToken, b.IdentityToken)
}

// planImport names a secret for every credential before anything is
// written. A secret that already claims exactly that registry (and no
// other) is updated in place, whatever its name; otherwise the secret is
// named after the registry, with a "-2", "-3"... suffix if the name is
// taken. Re-importing a file therefore lands on the same secrets.
func planImport(project string, existing []secret.Secret, creds []dockerconfig.DockerCredential) ([]importStep, error) {
	taken := map[string]bool{}
	claims := map[secret.Pattern]secret.Secret{}
	for _, s := range existing {
		taken[s.Name] = true
		for _, p := range s.Registries {
			claims[p] = s
		}
	}
	var steps []importStep
	for _, cr := range creds {
		if s, ok := claims[cr.Registry]; ok {
			if len(s.Registries) != 1 {
				return nil, fmt.Errorf("registry %s is already covered by secret %s in project %s together with %s; "+
					"rotate that secret, or delete it and import again", cr.Registry, s.Name, project, joinPatterns(slices.DeleteFunc(slices.Clone(s.Registries), func(p secret.Pattern) bool { return p == cr.Registry })))
			}
			steps = append(steps, importStep{cred: cr, name: s.Name, existed: true})
			continue
		}
		base := credhelper.NameFor(cr.Registry)
		name := base
		for n := 2; taken[name]; n++ {
			suffix := fmt.Sprintf("-%d", n)
			name = strings.TrimRight(base[:min(len(base), 63-len(suffix))], "-") + suffix
		}
		taken[name] = true
		steps = append(steps, importStep{cred: cr, name: name})
	}
	return steps, nil
}

// outputFlag registers -o and --output.
func outputFlag(fs *flag.FlagSet, def string) *string {
	o := def
	fs.StringVar(&o, "o", def, "")
	fs.StringVar(&o, "output", def, "")
	return &o
}

func checkOutput(o string, usage string, allowed ...string) error {
	if !slices.Contains(allowed, o) {
		return &usageError{msg: fmt.Sprintf("unknown output format %q (want %s)", printable(o), strings.Join(allowed, " or ")), usage: usage}
	}
	return nil
}

func timeString(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func (c *cli) secretList(args []string) error {
	fs := newFlagSet("list")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	out := outputFlag(fs, "table")
	all := fs.Bool("all-projects", false, "")
	pos, err := c.parseFlags(fs, args, listUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, listUsage); err != nil {
		return err
	}
	if err := checkOutput(*out, listUsage, "table", "json"); err != nil {
		return err
	}
	if *all && co.project != "" {
		return &usageError{msg: "--all-projects and --project cannot be used together", usage: listUsage}
	}
	project := ""
	if !*all {
		if project, err = c.projectName(co); err != nil {
			return err
		}
	}
	store, err := c.openStore(co)
	if err != nil {
		return err
	}
	list, err := store.List(c.ctx, project)
	if err != nil {
		return err
	}
	if *out == "json" {
		if list == nil {
			list = []secret.Secret{}
		}
		return writeJSON(c, list)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	if *all {
		fmt.Fprint(tw, "PROJECT\t")
	}
	fmt.Fprintln(tw, "NAME\tKIND\tREGISTRIES\tVERSION\tUPDATED")
	for _, s := range list {
		if *all {
			fmt.Fprintf(tw, "%s\t", s.Project)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", s.Name, s.Kind, joinPatterns(s.Registries), s.Version, timeString(s.Updated))
	}
	return tw.Flush()
}

func writeJSON(c *cli, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = c.stdout.Write(append(b, '\n'))
	return err
}

func (c *cli) secretShow(args []string) error {
	fs := newFlagSet("show")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	out := outputFlag(fs, "text")
	pos, err := c.parseFlags(fs, args, showUsage)
	if err != nil {
		return err
	}
	name, err := oneName(pos, showUsage)
	if err != nil {
		return err
	}
	if *out == "table" {
		*out = "text"
	}
	if err := checkOutput(*out, showUsage, "text", "json"); err != nil {
		return err
	}
	store, project, err := c.secretStore(co, name)
	if err != nil {
		return err
	}
	// Get reads metadata only: the value is never opened here.
	s, err := store.Get(c.ctx, project, name)
	if err != nil {
		return err
	}
	if *out == "json" {
		return writeJSON(c, s)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Name:\t%s\n", s.Name)
	fmt.Fprintf(tw, "Project:\t%s\n", s.Project)
	fmt.Fprintf(tw, "Kind:\t%s\n", s.Kind)
	fmt.Fprintf(tw, "Registries:\t%s\n", joinPatterns(s.Registries))
	fmt.Fprintf(tw, "Version:\t%d\n", s.Version)
	fmt.Fprintf(tw, "Created:\t%s\n", timeString(s.Created))
	fmt.Fprintf(tw, "Updated:\t%s\n", timeString(s.Updated))
	return tw.Flush()
}

func (c *cli) secretRotate(args []string) error {
	fs := newFlagSet("rotate")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	var vf valueFlags
	vf.register(fs)
	pos, err := c.parseFlags(fs, args, rotateUsage)
	if err != nil {
		return err
	}
	name, err := oneName(pos, rotateUsage)
	if err != nil {
		return err
	}
	kind, stdin, file, err := vf.source(rotateUsage)
	if err != nil {
		return err
	}
	if err := validUsername(vf.username); err != nil {
		return err
	}
	store, project, err := c.secretStore(co, name)
	if err != nil {
		return err
	}
	cur, err := store.Get(c.ctx, project, name)
	if err != nil {
		return err
	}
	if cur.Kind != kind {
		want := map[secret.Kind]string{secret.Basic: "--password-stdin", secret.Token: "--token-stdin"}[cur.Kind]
		if want == "" {
			return fmt.Errorf("secret %s is a %s secret, which this command cannot rotate", name, cur.Kind)
		}
		return fmt.Errorf("secret %s is a %s secret: rotate it with %s", name, cur.Kind, want)
	}
	v, err := vf.read(c, kind, stdin, file)
	if err != nil {
		return err
	}
	sec, err := store.Rotate(c.ctx, project, name, v)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "rotated secret %s (version %d, project %s)\n", sec.Name, sec.Version, sec.Project)
	return nil
}

func (c *cli) secretDelete(args []string) error {
	fs := newFlagSet("delete")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	pos, err := c.parseFlags(fs, args, deleteUsage)
	if err != nil {
		return err
	}
	name, err := oneName(pos, deleteUsage)
	if err != nil {
		return err
	}
	store, project, err := c.secretStore(co, name)
	if err != nil {
		return err
	}
	if err := store.Delete(c.ctx, project, name); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "deleted secret %s (project %s)\n", name, project)
	return nil
}
