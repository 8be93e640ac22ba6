package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/pullsecret/pullsecret/secret"
)

// newFlagSet makes a flag set that reports errors to its caller and
// prints nothing: usage is printed once, by run.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// flagError turns an error of the flag package into a usage error, or
// prints the usage when help was asked for.
func (c *cli) flagError(err error, usage string) error {
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(c.stdout, usage)
		return errHelpShown
	}
	msg := printable(err.Error())
	// The flag package names flags with one dash; users type two.
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
		msg = "unknown flag --" + name
		switch name {
		case "password", "p":
			msg += " (a password is read from standard input: use --password-stdin)"
		case "token":
			msg += " (a token is read from standard input: use --token-stdin)"
		}
	} else if rest, ok := strings.CutPrefix(msg, "invalid boolean value "); ok {
		// Never repeat the value: it may be a password typed in the wrong place.
		name := rest[strings.LastIndex(rest, " for -")+len(" for -"):]
		name, _, _ = strings.Cut(name, ":")
		msg = "--" + name + " takes no value"
	} else if name, ok := strings.CutPrefix(msg, "flag needs an argument: -"); ok {
		msg = "flag --" + name + " needs a value"
	}
	return &usageError{msg: msg, usage: usage}
}

// parseFlags parses flags and positional arguments in any order, as users
// type both "create NAME --flag" and "create --flag NAME". "--" ends the
// flags.
func (c *cli) parseFlags(fs *flag.FlagSet, args []string, usage string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, c.flagError(err, usage)
		}
		rest := fs.Args()
		consumed := len(args) - len(rest)
		if consumed > 0 && args[consumed-1] == "--" && !isFlagValue(fs, args, consumed-1) {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// isFlagValue reports whether args[i] is the value of the flag before it
// ("--username --" takes "--" as the user name).
func isFlagValue(fs *flag.FlagSet, args []string, i int) bool {
	if i == 0 {
		return false
	}
	prev := strings.TrimLeft(args[i-1], "-")
	if prev == args[i-1] || strings.Contains(prev, "=") {
		return false
	}
	f := fs.Lookup(prev)
	if f == nil {
		return false
	}
	if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
		return false
	}
	return true
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

// common are the flags every store command takes.
type common struct {
	project string
	home    string
	config  string // --config of the token and secret commands (metadata.go)
}

func (c *cli) commonFlags(fs *flag.FlagSet) *common {
	co := &common{}
	fs.StringVar(&co.project, "project", "", "")
	fs.StringVar(&co.home, "home", "", "")
	return co
}

// projectName is --project, else $PULLSECRET_PROJECT, else "default",
// validated.
func (c *cli) projectName(co *common) (string, error) {
	p := co.project
	if p == "" {
		p = c.getenv("PULLSECRET_PROJECT")
	}
	if p == "" {
		p = secret.DefaultProject
	}
	if err := secret.ValidName(p); err != nil {
		return "", fmt.Errorf("project: %w", err)
	}
	return p, nil
}

// openStore opens the sealed store: --home of the command, else the global
// --home, else the server config's home, else the environment
// (PULLSECRET_HOME and the fallbacks); its records where the server config
// (--config, $PULLSECRET_CONFIG) keeps them.
func (c *cli) openStore(co *common) (*secret.Store, error) {
	cfgHome, opts, err := c.configStoreOptions(co)
	if err != nil {
		return nil, err
	}
	home := c.home
	if co != nil && co.home != "" {
		home = co.home
	}
	if home == "" {
		home = cfgHome
	}
	getenv := c.getenv
	if home != "" {
		getenv = func(k string) string {
			if k == "PULLSECRET_HOME" {
				return home
			}
			return c.getenv(k)
		}
	}
	return secret.OpenFromEnv(getenv, opts...)
}

// maxValue bounds a secret value read from stdin or a file.
const maxValue = 64 << 10

// readValue reads a secret value from standard input or from file. One
// trailing newline is trimmed, as docker login --password-stdin does; an
// empty value, or one of several lines, is an error. Messages never quote
// the value.
func (c *cli) readValue(what string, fromStdin bool, file string) (string, error) {
	var r io.Reader
	src := "standard input"
	if fromStdin {
		r = c.stdin
	} else {
		f, err := os.Open(file)
		if err != nil {
			return "", fmt.Errorf("read %s: %w", what, err)
		}
		defer f.Close()
		r, src = f, file
	}
	b, err := io.ReadAll(io.LimitReader(r, maxValue+1))
	if err != nil {
		return "", fmt.Errorf("read %s from %s: %w", what, src, err)
	}
	defer clear(b)
	if len(b) > maxValue {
		return "", fmt.Errorf("the %s on %s is longer than %d KiB", what, src, maxValue>>10)
	}
	b = bytes.TrimSuffix(b, []byte("\n"))
	b = bytes.TrimSuffix(b, []byte("\r"))
	if len(b) == 0 {
		return "", fmt.Errorf("no %s on %s (pipe it in, e.g. printf '%%s' \"$VALUE\" | pullsecret ...)", what, src)
	}
	if bytes.ContainsAny(b, "\r\n") {
		return "", fmt.Errorf("the %s on %s has more than one line", what, src)
	}
	if bytes.ContainsFunc(b, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }) {
		return "", fmt.Errorf("the %s on %s contains control characters", what, src)
	}
	return string(b), nil
}

// readFile reads a whole input file ("-" for standard input), bounded.
func (c *cli) readFile(name string, limit int64) ([]byte, error) {
	var r io.Reader = c.stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		if st, err := f.Stat(); err == nil && st.IsDir() {
			return nil, fmt.Errorf("%s is a folder", name)
		}
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d MiB", name, limit>>20)
	}
	return b, nil
}
