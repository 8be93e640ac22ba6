package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
)

func tokenCommand() *command {
	return &command{
		summary: "Manage project tokens (logins to the proxy and the credential API)",
		sub: map[string]*command{
			"create": {summary: "Create a project token (printed once)", usage: tokenCreateUsage, run: (*cli).tokenCreate},
			"list":   {summary: "List project tokens (never the tokens themselves)", usage: tokenListUsage, run: (*cli).tokenList},
			"revoke": {summary: "Revoke a project token, at once", usage: tokenRevokeUsage, run: (*cli).tokenRevoke},
		},
	}
}

const tokenCreateUsage = `Usage: pullsecret token create [--project P] [--scope pull|push|credentials ...]
                              [--ttl DURATION] [--repository PATTERN ...] [--name N]

Create a project token and print it once, alone on standard output, so that
  TOKEN=$(pullsecret token create --project acme)
captures it; the details go to standard error. Only a hash of the token is
kept: it cannot be shown again. Clients log in to the proxy with it as the
password (any user name), and helpers in remote mode send it to the
credential API.

Flags:
  --scope SCOPE         pull (pull through the proxy; the default), push (push
                        through the proxy; includes pull) or credentials
                        (receive the project's upstream credentials from the
                        credential API). Repeatable, or comma-separated.
  --ttl DURATION        lifetime, e.g. 24h, 90m or 30d (default 30d, at most 5y)
  --repository PATTERN  limit the token to repositories, upstream host first:
                          ghcr.io            every repository on ghcr.io
                          ghcr.io/acme       ghcr.io/acme and below it
                          ghcr.io/acme/*     only below ghcr.io/acme
                        Repeatable. Default: every repository of the project.
  --name N              a label to recognise the token by
` + commonFlagsUsage + configFlagUsage

const tokenListUsage = `Usage: pullsecret token list [--project P] [-o table|json]

List project tokens: id, name, project, scopes, repositories, creation,
expiry and revocation. Never the token, nor its hash. Without --project,
the tokens of every project are listed.

Flags:
  --project P           list only the tokens of project P
  -o, --output FORMAT   table (default) or json
  --home DIR            data folder (default: $PULLSECRET_HOME)
` + configFlagUsage

const tokenRevokeUsage = `Usage: pullsecret token revoke ID

Revoke the project token ID (as 'pullsecret token list' shows it). It stops
working at once, on running servers too, and so do the registry tokens
issued for it. Give the servers' config (--config) when they share a
PostgreSQL database: every replica refuses the token at its next request.

Flags:
  --home DIR            data folder (default: $PULLSECRET_HOME)
` + configFlagUsage

// tokenStore opens the project token store: the server config's metadata
// database (--config, $PULLSECRET_CONFIG; metadata driver postgres), else
// the data folder (--home, the config's home, $PULLSECRET_HOME).
func (c *cli) tokenStore(co *common) (*proxy.TokenStore, error) {
	ts, cfg, err := c.databaseTokenStore(co)
	if ts != nil || err != nil {
		return ts, err
	}
	home := c.home
	if co != nil && co.home != "" {
		home = co.home
	}
	if home == "" {
		home = cfg.Home
	}
	if home == "" {
		var err error
		if home, err = secret.HomeFromEnv(c.getenv); err != nil {
			return nil, err
		}
	}
	return proxy.NewTokenStore(home)
}

// parseTTL reads a Go duration, or a whole number of days ("30d").
func parseTTL(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(d)
		if err != nil || n <= 0 || n > 100*366 {
			return 0, fmt.Errorf("invalid --ttl %q: want e.g. 24h or 30d", printable(s))
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("invalid --ttl %q: want a positive duration, e.g. 24h or 30d", printable(s))
	}
	return d, nil
}

func (c *cli) tokenCreate(args []string) error {
	fs := newFlagSet("create")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	var scopes, repos stringList
	fs.Var(&scopes, "scope", "")
	fs.Var(&repos, "repository", "")
	ttl := fs.String("ttl", "", "")
	name := fs.String("name", "", "")
	pos, err := c.parseFlags(fs, args, tokenCreateUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, tokenCreateUsage); err != nil {
		return err
	}
	project, err := c.projectName(co)
	if err != nil {
		return err
	}
	spec := proxy.TokenSpec{Project: project, Name: *name, Scopes: scopes, Repositories: repos}
	if *ttl != "" {
		if spec.TTL, err = parseTTL(*ttl); err != nil {
			return &usageError{msg: err.Error(), usage: tokenCreateUsage}
		}
	}
	store, err := c.tokenStore(co)
	if err != nil {
		return err
	}
	tok, info, err := store.Create(c.ctx, spec)
	if err != nil {
		return fmt.Errorf("create token: %w", err)
	}
	if _, err := fmt.Fprintln(c.stdout, tok); err != nil {
		return err
	}
	label := ""
	if info.Name != "" {
		label = " " + strconv.Quote(info.Name)
	}
	fmt.Fprintf(c.stderr, "note: created token %s%s for project %s: scopes %s, repositories %s, expires %s.\n"+
		"note: it is shown only now; keep it secret. Revoke it with 'pullsecret token revoke %s'.\n",
		info.ID, label, info.Project, strings.Join(info.Scopes, ","), reposString(info.Repositories), timeString(info.Expires), info.ID)
	return nil
}

func reposString(r []string) string {
	if len(r) == 0 {
		return "all"
	}
	return strings.Join(r, ",")
}

// tokenListItem is a token as `token list -o json` prints it.
type tokenListItem struct {
	proxy.TokenInfo
	Status string `json:"status"`
}

func (c *cli) tokenList(args []string) error {
	fs := newFlagSet("list")
	co := c.commonFlags(fs)
	c.configFlag(fs, co)
	out := outputFlag(fs, "table")
	pos, err := c.parseFlags(fs, args, tokenListUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, tokenListUsage); err != nil {
		return err
	}
	if err := checkOutput(*out, tokenListUsage, "table", "json"); err != nil {
		return err
	}
	if co.project != "" {
		if err := secret.ValidName(co.project); err != nil {
			return fmt.Errorf("project: %w", err)
		}
	}
	store, err := c.tokenStore(co)
	if err != nil {
		return err
	}
	list, err := store.List(c.ctx, co.project)
	if err != nil {
		return err
	}
	now := store.Now()
	if *out == "json" {
		items := make([]tokenListItem, 0, len(list))
		for _, t := range list {
			if t.Repositories == nil {
				t.Repositories = []string{}
			}
			items = append(items, tokenListItem{TokenInfo: t, Status: t.Status(now)})
		}
		return writeJSON(c, items)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tPROJECT\tSCOPES\tREPOSITORIES\tCREATED\tEXPIRES\tSTATUS")
	for _, t := range list {
		n := t.Name
		if n == "" {
			n = "-"
		}
		status := t.Status(now)
		if t.Revoked != nil {
			status += " " + timeString(*t.Revoked)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.ID, n, t.Project, strings.Join(t.Scopes, ","),
			reposString(t.Repositories), timeString(t.Created), timeString(t.Expires), status)
	}
	return tw.Flush()
}

func (c *cli) tokenRevoke(args []string) error {
	fs := newFlagSet("revoke")
	co := &common{}
	fs.StringVar(&co.home, "home", "", "")
	c.configFlag(fs, co)
	pos, err := c.parseFlags(fs, args, tokenRevokeUsage)
	if err != nil {
		return err
	}
	var id string
	switch len(pos) {
	case 0:
		return &usageError{msg: "missing ID", usage: tokenRevokeUsage}
	case 1:
		id = pos[0]
	default:
		return &usageError{msg: fmt.Sprintf("unexpected argument %q", printable(pos[1])), usage: tokenRevokeUsage}
	}
	if strings.HasPrefix(id, proxy.TokenPrefix) {
		// Someone pasted the token itself: never echo it.
		return &usageError{msg: "give the token's ID (see 'pullsecret token list'), not the token", usage: tokenRevokeUsage}
	}
	store, err := c.tokenStore(co)
	if err != nil {
		return err
	}
	before, err := store.Get(c.ctx, id)
	if errors.Is(err, proxy.ErrTokenNotFound) {
		return fmt.Errorf("no project token has the id %q", printable(id))
	}
	if err != nil {
		return err
	}
	info, err := store.Revoke(c.ctx, id)
	if err != nil {
		return fmt.Errorf("revoke token %s: %w", id, err)
	}
	if before.Revoked != nil {
		fmt.Fprintf(c.stdout, "token %s (project %s) was already revoked at %s\n", info.ID, info.Project, timeString(*info.Revoked))
		return nil
	}
	fmt.Fprintf(c.stdout, "revoked token %s (project %s); it stops working at once\n", info.ID, info.Project)
	return nil
}
