// Command pullsecret is the pullsecret server and admin CLI: it manages the
// sealed store of image pull secrets (secret, key) and, as command groups
// are added, serves them.
//
// Adding a command group is one entry in commands() and one file holding
// its command value.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strings"
	"syscall"
)

// commands lists the top-level commands.
func commands() map[string]*command {
	return map[string]*command{
		"secret":    secretCommand(),
		"key":       keyCommand(),
		"version":   versionCommand(),
		"token":     tokenCommand(),
		"spec":      specCommand(),
		"configure": configureCommand(),
		"serve":     serveCommand(),
		"demo":      demoCommand(),
		"cache":     cacheCommand(),
		"audit":     auditCommand(),
		"cluster":   clusterCommand(),
	}
}

const topUsage = `Usage: pullsecret [--home DIR] COMMAND [ARGS...]

Pull-time registry credentials for container images.

Commands:
%s
Global flags:
  --home DIR     data folder (default: $PULLSECRET_HOME, else
                 $XDG_DATA_HOME/pullsecret, else ~/.local/share/pullsecret)
  --version      print the version
  -h, --help     show this help

Secret values are read only from standard input or a file, never from the
command line or the environment. --project defaults to $PULLSECRET_PROJECT,
else "default".

Run 'pullsecret COMMAND --help' for a command's flags.
`

func main() {
	if len(os.Args) == 3 && os.Args[1] == credentialHelperArg {
		os.Exit(serveCredentialHelper(os.Args[2], os.Stdin, os.Stdout, os.Getenv))
	}
	if len(os.Args) == 2 && os.Args[1] == ecrExchangeArg {
		os.Exit(serveECRExchange(os.Stdin, os.Stdout, os.Stderr, os.Getenv))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// cli is one run of the program: its streams, environment and global
// flags. There is no other state.
type cli struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
	home   string // --home, overriding PULLSECRET_HOME
	// cleanup runs when the command has ended (database pools to close).
	cleanup []func()
}

// command is a leaf command (run) or a group of commands (sub).
type command struct {
	summary string
	// usage is the full help of a leaf; a group's is built from its
	// subcommands' summaries.
	usage string
	run   func(c *cli, args []string) error
	sub   map[string]*command
}

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// usageError is a mistake on the command line: it is printed with the
// usage of the command it concerns and exits 2.
type usageError struct {
	msg   string
	usage string
}

func (e *usageError) Error() string { return e.msg }

// errHelpShown says help was asked for and printed: exit 0.
var errHelpShown = errors.New("help shown")

// run is the whole program, so that tests call it in-process.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) (code int) {
	if stdin == nil {
		stdin = strings.NewReader("")
	}
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	c := &cli{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr, getenv: getenv}
	defer func() {
		for _, f := range c.cleanup {
			f()
		}
	}()
	defer func() {
		// A bug must not become a stack trace full of state, nor exit 2.
		if r := recover(); r != nil {
			fmt.Fprintln(stderr, "pullsecret: internal error (this is a bug; please report it)")
			code = exitError
		}
	}()
	err := c.main(args)
	var ue *usageError
	switch {
	case err == nil, errors.Is(err, errHelpShown):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "pullsecret: %s\n\n%s", ue.msg, ue.usage)
		return exitUsage
	default:
		fmt.Fprintf(stderr, "pullsecret: %s\n", err)
		return exitError
	}
}

// top is the root of the command tree.
func top() *command {
	return &command{sub: commands()}
}

func (c *cli) main(args []string) error {
	root := top()
	usage := root.groupUsage(nil)
	fs := newFlagSet("pullsecret")
	fs.StringVar(&c.home, "home", "", "")
	showVersion := fs.Bool("version", false, "")
	if err := fs.Parse(args); err != nil {
		return c.flagError(err, usage)
	}
	if *showVersion {
		return printVersion(c)
	}
	return c.dispatch(root, nil, fs.Args())
}

// dispatch runs the command that args name below cmd; path is how cmd was
// reached ("secret", ...).
func (c *cli) dispatch(cmd *command, path []string, args []string) error {
	if cmd.sub == nil {
		return cmd.run(c, args)
	}
	usage := cmd.groupUsage(path)
	if len(args) == 0 {
		return &usageError{msg: "missing command", usage: usage}
	}
	name := args[0]
	switch name {
	case "-h", "-help", "--help":
		fmt.Fprint(c.stdout, usage)
		return errHelpShown
	case "help":
		return c.help(cmd, path, args[1:])
	}
	sub, ok := cmd.sub[name]
	if !ok {
		if strings.HasPrefix(name, "-") {
			return &usageError{msg: fmt.Sprintf("unknown flag %s (flags go after the command)", printable(name)), usage: usage}
		}
		return &usageError{msg: fmt.Sprintf("unknown command %q", printable(strings.Join(append(slices.Clone(path), name), " "))), usage: usage}
	}
	return c.dispatch(sub, append(slices.Clone(path), name), args[1:])
}

// help prints the help of the command that args name below cmd.
func (c *cli) help(cmd *command, path []string, args []string) error {
	for _, a := range args {
		if cmd.sub == nil {
			break
		}
		sub, ok := cmd.sub[a]
		if !ok {
			return &usageError{msg: fmt.Sprintf("no help for unknown command %q", printable(strings.Join(append(path, a), " "))), usage: cmd.groupUsage(path)}
		}
		cmd, path = sub, append(slices.Clone(path), a)
	}
	if cmd.sub != nil {
		fmt.Fprint(c.stdout, cmd.groupUsage(path))
	} else {
		fmt.Fprint(c.stdout, cmd.usage)
	}
	return errHelpShown
}

// groupUsage lists a group's commands.
func (cmd *command) groupUsage(path []string) string {
	names := make([]string, 0, len(cmd.sub))
	width := 0
	for n := range cmd.sub {
		names = append(names, n)
		width = max(width, len(n))
	}
	sort.Strings(names)
	var list strings.Builder
	for _, n := range names {
		fmt.Fprintf(&list, "  %-*s  %s\n", width, n, cmd.sub[n].summary)
	}
	if len(path) == 0 {
		return fmt.Sprintf(topUsage, list.String())
	}
	p := "pullsecret " + strings.Join(path, " ")
	return fmt.Sprintf("Usage: %s COMMAND [ARGS...] [FLAGS]\n\n%s.\n\nCommands:\n%s\nRun '%s COMMAND --help' for a command's flags.\n",
		p, cmd.summary, list.String(), p)
}

// printable keeps user input in a message readable and short.
func printable(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return s
}
